//! The store conformance suite: every lifecycle edge and guarantee, run on every backend.
//!
//! Edges of the lifecycle (docs/lifecycle.md) and where each is tested:
//! - enqueue → available / scheduled: `enqueue_now_is_available_and_later_is_scheduled`
//! - scheduled → available (promoter) and scheduled → running when due: same test
//! - available → running (fetch): `fetch_claims_by_priority_then_run_at_and_sets_the_lease`
//! - running → completed / retryable / dead / scheduled (snooze) / cancelled / available
//!   (released): `finish_applies_every_outcome`
//! - retryable → running when due: `a_retryable_job_runs_again_when_due`
//! - running → retryable / dead / cancelled (lease expiry): `expired_leases_are_rescued`
//! - scheduled|available|retryable → cancelled, running → cancel requested:
//!   `cancel_waiting_and_running_jobs`
//! - dead|cancelled|completed → available (admin retry): `admin_retry_revives_with_a_fresh_budget`

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_tests::backend_tests;
use conveyor_worker::error::Error;
use conveyor_worker::store::{
    CancelResult, FetchRequest, Finish, JobFilter, Page, RetentionPolicy, StoreEvent,
};
use conveyor_worker::{
    AttemptOutcome, AttemptRecord, Job, JobId, JobState, NewJob, OperatorAction, RetryPolicy, Store,
};
use serde_json::json;

const LEASE: Duration = Duration::from_secs(30);

fn job(kind: &str) -> NewJob {
    NewJob::new(kind, json!({"n": 1}))
}

async fn fetch(s: &Arc<dyn Store>, queue: &str, n: u32) -> Vec<Job> {
    fetch_as(s, queue, n, "w1").await
}

async fn fetch_as(s: &Arc<dyn Store>, queue: &str, n: u32, worker: &str) -> Vec<Job> {
    s.fetch(FetchRequest {
        queue,
        limit: n,
        worker,
        lease: LEASE,
    })
    .await
    .expect("fetch works")
}

async fn get(s: &Arc<dyn Store>, id: JobId) -> Job {
    s.get(id).await.expect("get works").expect("job exists")
}

fn finish(
    j: &Job,
    state: JobState,
    outcome: AttemptOutcome,
    run_at: Option<DateTime<Utc>>,
) -> Finish {
    let now = Utc::now();
    Finish {
        id: j.id,
        attempt: j.attempt,
        state,
        run_at,
        attempt_delta: if matches!(
            outcome,
            AttemptOutcome::Snoozed | AttemptOutcome::Interrupted
        ) {
            -1
        } else {
            0
        },
        record: AttemptRecord {
            attempt: j.attempt,
            started_at: j.attempted_at.unwrap_or(now),
            finished_at: now,
            worker: Some("w1".into()),
            outcome,
            error: (outcome != AttemptOutcome::Completed)
                .then(|| format!("attempt {} went {outcome:?}", j.attempt)),
            causes: vec!["root cause: disk full".into()],
            duration_ms: 3,
            traceback: None,
        },
        result: None,
    }
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

async fn enqueue_now_is_available_and_later_is_scheduled(s: Arc<dyn Store>) {
    let now_job = s.enqueue(job("a")).await.unwrap();
    assert_eq!(
        (now_job.state, now_job.duplicate),
        (JobState::Available, false)
    );
    let later = s
        .enqueue(job("b").run_at(Utc::now() + secs(3600)))
        .await
        .unwrap();
    assert_eq!(later.state, JobState::Scheduled);

    let claimed = fetch(&s, "default", 10).await;
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![now_job.id],
        "a scheduled job is not claimed before its run_at"
    );

    // Nothing is due yet; an hour later the promoter makes it available.
    assert_eq!(s.promote_due(Utc::now(), 100).await.unwrap(), 0);
    assert_eq!(get(&s, later.id).await.state, JobState::Scheduled);
    assert_eq!(
        s.promote_due(Utc::now() + secs(3601), 100).await.unwrap(),
        1
    );
    assert_eq!(get(&s, later.id).await.state, JobState::Available);
    s.discard(later.id).await.unwrap();

    // A scheduled job whose time has come is claimed even if nobody promoted it.
    let soon = s
        .enqueue(job("c").run_at(Utc::now() + chrono::Duration::milliseconds(300)))
        .await
        .unwrap();
    assert_eq!(soon.state, JobState::Scheduled);
    let got = conveyor_tests::eventually(5, "the delayed job becomes due", || {
        let s = s.clone();
        async move {
            let v = fetch(&s, "default", 1).await;
            (!v.is_empty()).then_some(v)
        }
    })
    .await;
    assert_eq!(got[0].id, soon.id);
}

async fn a_delay_is_counted_on_the_store_clock(s: Arc<dyn Store>) {
    // The store runs on this machine here, so its clock and this one agree.
    let now = s.now().await.unwrap();
    assert!(
        (now - Utc::now()).num_seconds().abs() <= 5,
        "the store's clock reads {now}"
    );
    let later = s
        .enqueue(job("a").delay(std::time::Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(later.state, JobState::Scheduled);
    let due_in = (get(&s, later.id).await.run_at - now).num_seconds();
    assert!((3590..=3610).contains(&due_in), "due in {due_in} s");
    let at_once = s
        .enqueue(job("a").delay(std::time::Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(at_once.state, JobState::Available);
    let mut both = job("a").delay(std::time::Duration::from_secs(1));
    both.run_at = Some(now);
    let err = s.enqueue(both).await.unwrap_err().to_string();
    assert!(err.contains("not both"), "{err}");
}

async fn fetch_claims_by_priority_then_run_at_and_sets_the_lease(s: Arc<dyn Store>) {
    let past = Utc::now() - secs(60);
    let low_old = s.enqueue(job("k").priority(5).run_at(past)).await.unwrap();
    let high_new = s.enqueue(job("k").priority(1)).await.unwrap();
    let high_old = s.enqueue(job("k").priority(1).run_at(past)).await.unwrap();
    let other_queue = s.enqueue(job("k").queue("other")).await.unwrap();

    let before = Utc::now();
    let got = fetch(&s, "default", 2).await;
    assert_eq!(
        got.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![high_old.id, high_new.id]
    );
    for j in &got {
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.attempt, 1);
        assert_eq!(j.lease_owner.as_deref(), Some("w1"));
        let attempted = j.attempted_at.expect("attempted_at is set");
        assert!(attempted >= before - secs(1));
        let expires = j.lease_expires_at.expect("lease is set");
        let lease = (expires - attempted).num_seconds();
        assert!((29..=31).contains(&lease), "lease of {lease}s");
    }
    let rest = fetch(&s, "default", 10).await;
    assert_eq!(
        rest.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![low_old.id]
    );
    assert!(fetch(&s, "default", 10).await.is_empty());
    assert_eq!(fetch(&s, "other", 10).await[0].id, other_queue.id);
}

async fn concurrent_fetchers_never_share_a_job(s: Arc<dyn Store>) {
    let jobs: Vec<NewJob> = (0..400).map(|_| job("k")).collect();
    s.enqueue_many(jobs).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = fetch_as(&s, "default", 7, &format!("w{w}")).await;
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 400, "every job claimed once");
    assert_eq!(unique.len(), 400, "no job claimed twice");
}

async fn leased_to_lists_a_workers_running_jobs_of_one_queue(s: Arc<dyn Store>) {
    s.enqueue_many((0..5).map(|_| job("k")).collect())
        .await
        .unwrap();
    s.enqueue(job("k").queue("other")).await.unwrap();
    let mine = fetch_as(&s, "default", 3, "w1").await;
    fetch_as(&s, "default", 1, "w2").await;
    fetch_as(&s, "other", 1, "w1").await;
    let done = &mine[0];
    s.finish(vec![finish(
        done,
        JobState::Completed,
        AttemptOutcome::Completed,
        None,
    )])
    .await
    .unwrap();

    let mut leased: Vec<JobId> = s
        .leased_to("w1", "default")
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    leased.sort();
    let mut want: Vec<JobId> = mine[1..].iter().map(|j| j.id).collect();
    want.sort();
    assert_eq!(leased, want, "running, this worker, this queue");
    assert!(s.leased_to("w3", "default").await.unwrap().is_empty());
}

async fn finish_applies_every_outcome(s: Arc<dyn Store>) {
    let ids = s
        .enqueue_many((0..6).map(|_| job("k")).collect())
        .await
        .unwrap();
    assert_eq!(ids.len(), 6);
    let got = fetch(&s, "default", 6).await;
    assert_eq!(got.len(), 6);
    let later = Utc::now() + secs(600);
    let outcomes = [
        (JobState::Completed, AttemptOutcome::Completed, None),
        (JobState::Retryable, AttemptOutcome::Failed, Some(later)),
        (JobState::Dead, AttemptOutcome::Failed, None),
        (JobState::Scheduled, AttemptOutcome::Snoozed, Some(later)),
        (JobState::Cancelled, AttemptOutcome::Cancelled, None),
        (
            JobState::Available,
            AttemptOutcome::Interrupted,
            Some(Utc::now()),
        ),
    ];
    let batch: Vec<Finish> = got
        .iter()
        .zip(outcomes)
        .map(|(j, (st, oc, at))| finish(j, st, oc, at))
        .collect();
    assert_eq!(s.finish(batch).await.unwrap(), 6);

    for (j, (state, outcome, run_at)) in got.iter().zip(outcomes) {
        let now = get(&s, j.id).await;
        assert_eq!(now.state, state);
        assert_eq!(
            now.finalized_at.is_some(),
            state.is_terminal(),
            "finalized_at iff terminal ({state})"
        );
        assert_eq!(now.lease_owner, None);
        assert_eq!(now.lease_expires_at, None);
        assert_eq!(now.attempts.len(), 1);
        assert_eq!(now.attempts[0].outcome, outcome);
        assert_eq!(
            now.attempts[0].causes,
            vec!["root cause: disk full".to_string()]
        );
        let expected_attempt = if matches!(
            outcome,
            AttemptOutcome::Snoozed | AttemptOutcome::Interrupted
        ) {
            0
        } else {
            1
        };
        assert_eq!(now.attempt, expected_attempt, "{state}");
        if let (Some(at), false) = (run_at, state.is_terminal()) {
            assert!(
                (now.run_at - at).num_milliseconds().abs() < 5,
                "run_at stored for {state}"
            );
        }
    }
    // The released one runs again right away, the others do not.
    let again = fetch(&s, "default", 10).await;
    assert_eq!(
        again.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![got[5].id]
    );
}

async fn a_large_due_backlog_is_claimed_in_bounded_steps(s: Arc<dyn Store>) {
    // More due jobs than any one step handles: bulk enqueue, fetch and the promoter must all
    // keep working (a store that unpacks the whole due set at once fails here).
    let due = Utc::now() + chrono::Duration::milliseconds(200);
    let out = s
        .enqueue_many((0..2500).map(|_| job("k").run_at(due)).collect())
        .await
        .unwrap();
    assert_eq!(out.len(), 2500);
    assert!(out.iter().all(|e| e.state == JobState::Scheduled));
    let got = conveyor_tests::eventually(5, "the backlog becomes due", || {
        let s = s.clone();
        async move {
            let v = fetch(&s, "default", 10).await;
            (!v.is_empty()).then_some(v)
        }
    })
    .await;
    assert_eq!(got.len(), 10);
    s.promote_due(Utc::now(), 100_000).await.unwrap();
    assert_eq!(
        s.count(&JobFilter::state(JobState::Available))
            .await
            .unwrap(),
        2490
    );
    assert_eq!(fetch(&s, "default", 1000).await.len(), 1000);
}

async fn stale_outcomes_are_ignored(s: Arc<dyn Store>) {
    s.enqueue(job("k")).await.unwrap();
    let first = s
        .fetch(FetchRequest {
            queue: "default",
            limit: 1,
            worker: "w1",
            lease: Duration::from_millis(1),
        })
        .await
        .unwrap()
        .remove(0);
    // The lease expires and another worker takes the job.
    let no_wait = RetryPolicy {
        base: Duration::ZERO,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let report = s
        .rescue_expired(
            Utc::now() + chrono::Duration::milliseconds(5),
            &no_wait,
            100,
        )
        .await
        .unwrap();
    assert_eq!(report.retried, 1);
    let second = conveyor_tests::eventually(5, "the rescued job is claimable", || {
        let s = s.clone();
        async move { fetch_as(&s, "default", 1, "w2").await.pop() }
    })
    .await;
    assert_eq!(second.attempt, 2);
    // The first worker's late outcome changes nothing.
    let applied = s
        .finish(vec![finish(
            &first,
            JobState::Completed,
            AttemptOutcome::Completed,
            None,
        )])
        .await
        .unwrap();
    assert_eq!(applied, 0);
    let now = get(&s, first.id).await;
    assert_eq!(
        (now.state, now.attempt, now.lease_owner.as_deref()),
        (JobState::Running, 2, Some("w2"))
    );
}

async fn a_retryable_job_runs_again_when_due(s: Arc<dyn Store>) {
    s.enqueue(job("k").max_attempts(3)).await.unwrap();
    let j = fetch(&s, "default", 1).await.remove(0);
    let due = Utc::now() + chrono::Duration::milliseconds(200);
    s.finish(vec![finish(
        &j,
        JobState::Retryable,
        AttemptOutcome::Failed,
        Some(due),
    )])
    .await
    .unwrap();
    assert!(
        fetch(&s, "default", 1).await.is_empty(),
        "not before its backoff"
    );
    let again = conveyor_tests::eventually(5, "retryable job comes due", || {
        let s = s.clone();
        async move { fetch(&s, "default", 1).await.pop() }
    })
    .await;
    assert_eq!((again.id, again.attempt), (j.id, 2));
    assert_eq!(again.attempts.len(), 1, "history kept");
}

async fn expired_leases_are_rescued(s: Arc<dyn Store>) {
    let policy = RetryPolicy {
        base: Duration::from_secs(10),
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let retry = s.enqueue(job("k").max_attempts(3)).await.unwrap();
    let last = s.enqueue(job("k").max_attempts(1)).await.unwrap();
    let cancel = s.enqueue(job("k").max_attempts(3)).await.unwrap();
    let fresh = s.enqueue(job("k").queue("other")).await.unwrap();
    assert_eq!(fetch(&s, "default", 3).await.len(), 3);
    assert_eq!(s.cancel(cancel.id).await.unwrap(), CancelResult::Requested);

    // Nothing has expired yet.
    assert_eq!(
        s.rescue_expired(Utc::now(), &policy, 100)
            .await
            .unwrap()
            .retried,
        0
    );
    let later = Utc::now() + secs(60);
    fetch(&s, "other", 1).await;
    let held = [retry.id, last.id, cancel.id, fresh.id];
    s.heartbeat("w1", &held, Duration::from_secs(3600))
        .await
        .unwrap();
    // The heartbeat renewed w1's leases: still nothing to rescue.
    let r = s.rescue_expired(later, &policy, 100).await.unwrap();
    assert_eq!((r.retried, r.dead, r.cancelled), (0, 0, 0));

    let much_later = Utc::now() + secs(7200);
    // Two rescuers at once must not double count.
    let (a, b) = tokio::join!(
        s.rescue_expired(much_later, &policy, 100),
        s.rescue_expired(much_later, &policy, 100)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.retried + b.retried,
        2,
        "one default job and the `other` job"
    );
    assert_eq!(a.dead + b.dead, 1);
    assert_eq!(a.cancelled + b.cancelled, 1);

    let r = get(&s, retry.id).await;
    assert_eq!(r.state, JobState::Retryable);
    assert_eq!(
        r.attempts.last().unwrap().outcome,
        AttemptOutcome::LeaseExpired
    );
    assert_eq!(r.attempts.last().unwrap().worker.as_deref(), Some("w1"));
    assert!(
        r.attempts
            .last()
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("lease expired")
    );
    let wait = (r.run_at - much_later).num_seconds();
    assert!((9..=11).contains(&wait), "backoff after rescue: {wait}s");
    let d = get(&s, last.id).await;
    assert_eq!((d.state, d.finalized_at.is_some()), (JobState::Dead, true));
    assert_eq!(get(&s, cancel.id).await.state, JobState::Cancelled);
    assert_eq!(get(&s, fresh.id).await.state, JobState::Retryable);
}

async fn cancel_waiting_and_running_jobs(s: Arc<dyn Store>) {
    let mut events = s.subscribe();
    let waiting = s
        .enqueue(job("k").run_at(Utc::now() + secs(60)))
        .await
        .unwrap();
    let running = s.enqueue(job("k")).await.unwrap();
    fetch(&s, "default", 1).await;

    assert_eq!(s.cancel(waiting.id).await.unwrap(), CancelResult::Cancelled);
    let w = get(&s, waiting.id).await;
    assert_eq!(
        (w.state, w.finalized_at.is_some()),
        (JobState::Cancelled, true)
    );

    assert_eq!(s.cancel(running.id).await.unwrap(), CancelResult::Requested);
    assert!(get(&s, running.id).await.cancel_requested_at.is_some());
    assert_eq!(
        s.heartbeat("w1", &[running.id], LEASE).await.unwrap(),
        vec![running.id]
    );
    let saw_cancel = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Ok(StoreEvent::CancelRequested { id }) if id == running.id => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(saw_cancel, "a cancel request reaches subscribers");

    match s.cancel(waiting.id).await {
        Err(Error::WrongState {
            state: JobState::Cancelled,
            ..
        }) => {}
        other => panic!("cancelling a finished job must be refused, got {other:?}"),
    }
    match s.cancel(JobId::new()).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

async fn admin_retry_revives_with_a_fresh_budget(s: Arc<dyn Store>) {
    let e = s.enqueue(job("k").max_attempts(1)).await.unwrap();
    let j = fetch(&s, "default", 1).await.remove(0);
    s.finish(vec![finish(
        &j,
        JobState::Dead,
        AttemptOutcome::Failed,
        None,
    )])
    .await
    .unwrap();

    let revived = s.retry(e.id).await.unwrap();
    assert_eq!(
        (revived.state, revived.attempt, revived.finalized_at),
        (JobState::Available, 0, None)
    );
    assert_eq!(revived.attempts.len(), 1, "history kept");
    let again = fetch(&s, "default", 1).await.remove(0);
    assert_eq!((again.id, again.attempt), (e.id, 1));
    match s.retry(e.id).await {
        Err(Error::WrongState {
            state: JobState::Running,
            ..
        }) => {}
        other => panic!("retrying a running job must be refused, got {other:?}"),
    }
    match s.retry(JobId::new()).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Bulk: every dead job of kind `bulk`, and nothing else.
    let dead: Vec<_> = s
        .enqueue_many((0..5).map(|_| job("bulk").max_attempts(1)).collect())
        .await
        .unwrap();
    let other = s.enqueue(job("keep").max_attempts(1)).await.unwrap();
    let got = fetch(&s, "default", 10).await;
    let batch = got
        .iter()
        .map(|j| finish(j, JobState::Dead, AttemptOutcome::Failed, None))
        .collect();
    s.finish(batch).await.unwrap();
    let filter = JobFilter {
        states: vec![JobState::Dead],
        kind: Some("bulk".into()),
        ..JobFilter::default()
    };
    assert_eq!(s.count(&filter).await.unwrap(), 5);
    assert_eq!(s.retry_matching(&filter).await.unwrap(), 5);
    for d in dead {
        assert_eq!(get(&s, d.id).await.state, JobState::Available);
    }
    assert_eq!(get(&s, other.id).await.state, JobState::Dead);
}

async fn discard_and_purge(s: Arc<dyn Store>) {
    let a = s.enqueue(job("k").max_attempts(1)).await.unwrap();
    let b = s.enqueue(job("k").max_attempts(1)).await.unwrap();
    let waiting = s
        .enqueue(job("k").run_at(Utc::now() + secs(60)))
        .await
        .unwrap();
    let got = fetch(&s, "default", 2).await;
    s.finish(
        got.iter()
            .map(|j| finish(j, JobState::Dead, AttemptOutcome::Failed, None))
            .collect(),
    )
    .await
    .unwrap();
    let running = s.enqueue(job("k")).await.unwrap();
    fetch(&s, "default", 1).await;

    s.discard(a.id).await.unwrap();
    assert!(s.get(a.id).await.unwrap().is_none());
    assert!(matches!(
        s.discard(running.id).await,
        Err(Error::WrongState { .. })
    ));
    assert!(matches!(s.discard(a.id).await, Err(Error::NotFound(_))));

    // Purge touches finished jobs only, whatever the filter says.
    let n = s.purge(&JobFilter::default()).await.unwrap();
    assert_eq!(n, 1);
    assert!(s.get(b.id).await.unwrap().is_none());
    assert!(s.get(waiting.id).await.unwrap().is_some());
    assert!(s.get(running.id).await.unwrap().is_some());
}

async fn idempotency_keys_dedupe_single_and_bulk(s: Arc<dyn Store>) {
    let first = s
        .enqueue(job("k").idempotency_key("order-1"))
        .await
        .unwrap();
    let again = s
        .enqueue(job("k").idempotency_key("order-1"))
        .await
        .unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(again.id, first.id);

    // A batch with one duplicate of a stored job and one duplicate within itself.
    let batch = vec![
        job("k").idempotency_key("b-1"),
        job("k").idempotency_key("order-1"),
        job("k"),
        job("k").idempotency_key("b-1"),
        job("k").idempotency_key("b-2"),
    ];
    let res = s.enqueue_many(batch).await.unwrap();
    assert_eq!(
        res.iter().map(|r| r.duplicate).collect::<Vec<_>>(),
        vec![false, true, false, true, false]
    );
    assert_eq!(res[1].id, first.id);
    assert_eq!(res[3].id, res[0].id);
    assert_eq!(s.count(&JobFilter::default()).await.unwrap(), 4);

    // Invalid input fails the whole batch and inserts nothing.
    let bad = vec![job("k").idempotency_key("b-9"), job("not a kind!")];
    match s.enqueue_many(bad).await {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "kind"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(s.count(&JobFilter::default()).await.unwrap(), 4);
}

async fn ids_are_assigned_per_job_or_taken_from_the_caller(s: Arc<dyn Store>) {
    // Clones of one template are distinct jobs.
    let template = job("clone").queue("ids");
    let out = s.enqueue_many(vec![template; 3]).await.unwrap();
    let ids: HashSet<JobId> = out.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 3, "{out:?}");
    assert!(out.iter().all(|e| !e.duplicate));

    // A caller-chosen id is kept; reusing it is a clear error that names the id.
    let mine = JobId::new();
    let e = s.enqueue(job("mine").id(mine)).await.unwrap();
    assert_eq!(e.id, mine);
    assert_eq!(get(&s, mine).await.kind, "mine");
    let err = s.enqueue(job("again").id(mine)).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "id"),
        "{err:?}"
    );
    assert!(err.to_string().contains(&mine.to_string()), "{err}");
    assert_eq!(
        get(&s, mine).await.kind,
        "mine",
        "the first job is untouched"
    );
}

async fn one_hundred_concurrent_enqueues_make_one_job(s: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.enqueue(job("k").idempotency_key("same")).await.unwrap()
        }));
    }
    let mut ids = HashSet::new();
    let mut fresh = 0;
    for t in tasks {
        let e = t.await.unwrap();
        ids.insert(e.id);
        fresh += usize::from(!e.duplicate);
    }
    assert_eq!((ids.len(), fresh), (1, 1));
    assert_eq!(s.count(&JobFilter::default()).await.unwrap(), 1);
}

async fn keys_outlive_the_job_for_their_window(s: Arc<dyn Store>) {
    let policy = RetentionPolicy {
        completed: Duration::from_secs(60),
        idempotency: Duration::from_secs(3600),
        ..RetentionPolicy::default()
    };
    let keyed = s.enqueue(job("k").idempotency_key("late")).await.unwrap();
    let plain = s.enqueue(job("k")).await.unwrap();
    let got = fetch(&s, "default", 2).await;
    s.finish(
        got.iter()
            .map(|j| finish(j, JobState::Completed, AttemptOutcome::Completed, None))
            .collect(),
    )
    .await
    .unwrap();

    // Past the completed retention but inside the key window: only the plain job goes.
    assert_eq!(
        s.prune(Utc::now() + secs(120), &policy, 100).await.unwrap(),
        1
    );
    assert!(s.get(plain.id).await.unwrap().is_none());
    let late = s.enqueue(job("k").idempotency_key("late")).await.unwrap();
    assert!(late.duplicate, "a late retry of the enqueue still dedupes");
    assert_eq!(late.id, keyed.id);

    // After the window the key is free again.
    assert_eq!(
        s.prune(Utc::now() + secs(3700), &policy, 100)
            .await
            .unwrap(),
        1
    );
    let reborn = s.enqueue(job("k").idempotency_key("late")).await.unwrap();
    assert!(!reborn.duplicate);
    assert_ne!(reborn.id, keyed.id);
}

async fn retention_prunes_by_state(s: Arc<dyn Store>) {
    let policy = RetentionPolicy::default();
    let ids = s
        .enqueue_many((0..3).map(|_| job("k").max_attempts(1)).collect())
        .await
        .unwrap();
    let waiting = s
        .enqueue(job("k").run_at(Utc::now() + secs(600_000_000)))
        .await
        .unwrap();
    let got = fetch(&s, "default", 3).await;
    let states = [JobState::Completed, JobState::Dead, JobState::Cancelled];
    let outcomes = [
        AttemptOutcome::Completed,
        AttemptOutcome::Failed,
        AttemptOutcome::Cancelled,
    ];
    s.finish(
        got.iter()
            .zip(states.iter().zip(outcomes))
            .map(|(j, (st, oc))| finish(j, *st, oc, None))
            .collect(),
    )
    .await
    .unwrap();

    assert_eq!(
        s.prune(Utc::now() + secs(3600), &policy, 100)
            .await
            .unwrap(),
        0,
        "nothing is old yet"
    );
    assert_eq!(
        s.prune(Utc::now() + secs(25 * 3600), &policy, 100)
            .await
            .unwrap(),
        1,
        "completed after 24 h"
    );
    assert!(s.get(ids[0].id).await.unwrap().is_none());
    assert!(
        s.get(ids[1].id).await.unwrap().is_some(),
        "dead jobs stay 30 days"
    );
    assert_eq!(
        s.prune(Utc::now() + secs(31 * 24 * 3600), &policy, 100)
            .await
            .unwrap(),
        2
    );
    assert!(
        s.get(waiting.id).await.unwrap().is_some(),
        "waiting jobs are never pruned"
    );

    // Bounded: a pass deletes at most `limit`.
    let many = s
        .enqueue_many((0..30).map(|_| job("k")).collect())
        .await
        .unwrap();
    assert_eq!(many.len(), 30);
    let got = fetch(&s, "default", 30).await;
    s.finish(
        got.iter()
            .map(|j| finish(j, JobState::Completed, AttemptOutcome::Completed, None))
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(
        s.prune(Utc::now() + secs(25 * 3600), &policy, 10)
            .await
            .unwrap(),
        10
    );
}

async fn listing_filters_and_pages(s: Arc<dyn Store>) {
    for i in 0..25 {
        let q = if i % 5 == 0 { "mail" } else { "default" };
        let mut j = job(if i % 2 == 0 { "even" } else { "odd" }).queue(q);
        if i == 7 {
            j = j.tags(["vip"]);
        }
        s.enqueue(j).await.unwrap();
    }
    let got = fetch(&s, "default", 3).await;
    let mut failing = finish(&got[0], JobState::Dead, AttemptOutcome::Failed, None);
    failing.record.error = Some("SMTP said: 550 Mailbox Unavailable".into());
    failing.record.causes = vec!["relay \"mx1\" refused: Greylisted".into()];
    s.finish(vec![failing]).await.unwrap();

    // Newest first, keyset pages that neither skip nor repeat.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .list(&JobFilter::default(), Page { before, limit: 10 })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|j| j.id);
        seen.extend(page.into_iter().map(|j| j.id));
    }
    assert_eq!(seen.len(), 25);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted);

    let f = |f: JobFilter| {
        let s = s.clone();
        async move { s.count(&f).await.unwrap() }
    };
    assert_eq!(
        f(JobFilter {
            queue: Some("mail".into()),
            ..Default::default()
        })
        .await,
        5
    );
    assert_eq!(
        f(JobFilter {
            kind: Some("odd".into()),
            ..Default::default()
        })
        .await,
        12
    );
    assert_eq!(
        f(JobFilter {
            tag: Some("vip".into()),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(f(JobFilter::state(JobState::Running)).await, 2);
    assert_eq!(
        f(JobFilter {
            states: vec![JobState::Running, JobState::Dead],
            ..Default::default()
        })
        .await,
        3
    );
    let by_error = s
        .list(
            &JobFilter {
                error_contains: Some("mailbox unavail".into()),
                ..Default::default()
            },
            Page::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        by_error.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![got[0].id]
    );
    // In a cause, whatever the case, and with characters JSON escapes in the stored history.
    for text in ["greylisted", "\"mx1\" REFUSED", "MAILBOX"] {
        assert_eq!(
            f(JobFilter {
                error_contains: Some(text.into()),
                ..Default::default()
            })
            .await,
            1,
            "{text}"
        );
    }
    assert_eq!(
        f(JobFilter {
            error_contains: Some("100%_".into()),
            ..Default::default()
        })
        .await,
        0,
        "LIKE wildcards are literal"
    );
    assert_eq!(
        f(JobFilter {
            created_after: Some(Utc::now() + secs(10)),
            ..Default::default()
        })
        .await,
        0
    );
    assert_eq!(
        f(JobFilter {
            created_before: Some(Utc::now() + secs(10)),
            ..Default::default()
        })
        .await,
        25
    );
    assert_eq!(
        f(JobFilter {
            ids: vec![got[1].id, got[2].id],
            ..Default::default()
        })
        .await,
        2
    );
    assert!(matches!(
        s.list(
            &JobFilter::default(),
            Page {
                before: None,
                limit: 0
            }
        )
        .await,
        Err(Error::InvalidInput { .. })
    ));
}

async fn queue_stats_count_by_state(s: Arc<dyn Store>) {
    s.enqueue_many(
        (0..4)
            .map(|_| job("k").run_at(Utc::now() - secs(30)))
            .collect(),
    )
    .await
    .unwrap();
    s.enqueue(job("k").queue("mail")).await.unwrap();
    s.enqueue(job("k").queue("mail").run_at(Utc::now() + secs(60)))
        .await
        .unwrap();
    fetch(&s, "default", 1).await;
    let stats = s.queue_stats().await.unwrap();
    let d = stats
        .iter()
        .find(|q| q.queue == "default")
        .expect("default queue listed");
    assert_eq!(d.counts.get(&JobState::Available), Some(&3));
    assert_eq!(d.counts.get(&JobState::Running), Some(&1));
    let age = d.oldest_available_age.expect("has an oldest job").as_secs();
    assert!(
        (29..=40).contains(&age),
        "oldest available is ~30 s old: {age}"
    );
    let m = stats
        .iter()
        .find(|q| q.queue == "mail")
        .expect("mail queue listed");
    assert_eq!(m.counts.get(&JobState::Scheduled), Some(&1));
    assert_eq!(m.counts.get(&JobState::Available), Some(&1));
}

/// The per-queue totals behind `queue_stats` and state-only counts (kept by the store, not
/// counted from rows) equal a count of the rows after every kind of transition.
async fn counts_follow_every_transition(s: Arc<dyn Store>) {
    async fn exact(s: &Arc<dyn Store>, step: &str) {
        let stats = s.queue_stats().await.unwrap();
        for queue in ["default", "mail"] {
            let listed = stats.iter().find(|q| q.queue == queue);
            for state in JobState::ALL {
                let quick = JobFilter {
                    states: vec![state],
                    queue: Some(queue.into()),
                    ..JobFilter::default()
                };
                // A created-since filter that matches every job makes the store count rows.
                let scanned = JobFilter {
                    created_after: Some(DateTime::<Utc>::UNIX_EPOCH),
                    ..quick.clone()
                };
                let rows = s.count(&scanned).await.unwrap();
                assert_eq!(
                    s.count(&quick).await.unwrap(),
                    rows,
                    "{step}: count of {state:?} in {queue}"
                );
                let shown = listed
                    .and_then(|q| q.counts.get(&state))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(
                    shown as u64, rows,
                    "{step}: queue_stats {state:?} in {queue}"
                );
            }
        }
        let all = s.count(&JobFilter::default()).await.unwrap();
        let rows = s
            .count(&JobFilter {
                created_after: Some(DateTime::<Utc>::UNIX_EPOCH),
                ..JobFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(all, rows, "{step}: count of every job");
    }

    exact(&s, "empty").await;
    s.enqueue_many((0..6).map(|_| job("k").max_attempts(2)).collect())
        .await
        .unwrap();
    s.enqueue_many(
        (0..3)
            .map(|_| job("k").queue("mail").run_at(Utc::now() + secs(30)))
            .collect(),
    )
    .await
    .unwrap();
    exact(&s, "enqueued").await;
    let got = fetch(&s, "default", 6).await;
    exact(&s, "claimed").await;
    s.heartbeat("w1", &got.iter().map(|j| j.id).collect::<Vec<_>>(), LEASE)
        .await
        .unwrap();
    exact(&s, "heartbeat").await;
    s.finish(vec![
        finish(
            &got[0],
            JobState::Completed,
            AttemptOutcome::Completed,
            None,
        ),
        finish(&got[1], JobState::Dead, AttemptOutcome::Failed, None),
        finish(
            &got[2],
            JobState::Retryable,
            AttemptOutcome::Failed,
            Some(Utc::now() - secs(1)),
        ),
        finish(
            &got[3],
            JobState::Cancelled,
            AttemptOutcome::Cancelled,
            None,
        ),
    ])
    .await
    .unwrap();
    exact(&s, "finished").await;
    s.fold_counts().await.unwrap();
    exact(&s, "folded").await;
    // got[4] and got[5] stay running; their leases expire.
    let r = s
        .rescue_expired(Utc::now() + secs(3600), &RetryPolicy::default(), 100)
        .await
        .unwrap();
    assert_eq!(r.retried, 2);
    exact(&s, "rescued").await;
    assert!(s.promote_due(Utc::now() + secs(60), 100).await.unwrap() >= 3);
    exact(&s, "promoted").await;
    let running = fetch(&s, "default", 1).await;
    assert_eq!(
        s.cancel(running[0].id).await.unwrap(),
        CancelResult::Requested
    );
    let waiting = s
        .list(&JobFilter::state(JobState::Available), Page::default())
        .await
        .unwrap();
    assert_eq!(
        s.cancel(waiting[0].id).await.unwrap(),
        CancelResult::Cancelled
    );
    exact(&s, "cancelled").await;
    s.retry(got[1].id).await.unwrap();
    assert_eq!(
        s.retry_matching(&JobFilter::state(JobState::Cancelled))
            .await
            .unwrap(),
        2
    );
    exact(&s, "retried").await;
    s.discard(got[0].id).await.unwrap();
    exact(&s, "discarded").await;
    let more = fetch(&s, "default", 3).await;
    s.finish(
        more.iter()
            .map(|j| finish(j, JobState::Dead, AttemptOutcome::Failed, None))
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(
        s.purge(&JobFilter::state(JobState::Dead)).await.unwrap(),
        more.len() as u64
    );
    exact(&s, "purged").await;
    s.enqueue_many((0..2).map(|_| job("k")).collect())
        .await
        .unwrap();
    let last = fetch(&s, "default", 10).await;
    assert!(!last.is_empty());
    s.finish(
        last.iter()
            .map(|j| finish(j, JobState::Completed, AttemptOutcome::Completed, None))
            .collect(),
    )
    .await
    .unwrap();
    let pruned = s
        .prune(
            Utc::now() + secs(25 * 3600),
            &RetentionPolicy::default(),
            1000,
        )
        .await
        .unwrap();
    assert!(pruned > 0);
    exact(&s, "pruned").await;
    s.fold_counts().await.unwrap();
    exact(&s, "folded again").await;
}

async fn enqueue_wakes_subscribers(s: Arc<dyn Store>) {
    let mut events = s.subscribe();
    s.enqueue(job("k").queue("wake")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(StoreEvent::JobsAvailable { queue }) = events.recv().await
                && queue == "wake"
            {
                return;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "an enqueue wakes the queue's workers");
}

async fn backend_reports_its_name_and_health(s: Arc<dyn Store>) {
    let name = s.backend_name().await.unwrap();
    assert!(
        name.starts_with("SQLite 3")
            || name.starts_with("Postgres 1")
            || name.starts_with("Redis "),
        "{name}"
    );
    s.ping().await.unwrap();
    s.migrate().await.expect("migrating twice is a no-op");
}

/// Durations from input at their extremes: `Duration::MAX` retention keeps everything (it
/// saturates, never overflows), zero retention prunes every finished job, a delay of
/// `Duration::MAX` schedules at the latest instant the store keeps, and a rescue or
/// promotion at either end of time changes nothing it should not.
async fn extreme_durations_saturate(s: Arc<dyn Store>) {
    let ids = s
        .enqueue_many((0..2).map(|_| job("k").max_attempts(1)).collect())
        .await
        .unwrap();
    let got = fetch(&s, "default", 2).await;
    s.finish(
        got.iter()
            .map(|j| finish(j, JobState::Completed, AttemptOutcome::Completed, None))
            .collect(),
    )
    .await
    .unwrap();
    let forever = RetentionPolicy {
        completed: Duration::MAX,
        cancelled: Duration::MAX,
        dead: Duration::MAX,
        idempotency: Duration::MAX,
    };
    assert_eq!(s.prune(Utc::now(), &forever, 100).await.unwrap(), 0);
    assert_eq!(
        s.prune(conveyor_worker::store::LATEST, &forever, 100)
            .await
            .unwrap(),
        0,
        "kept forever, even at the end of time"
    );
    let never = RetentionPolicy {
        completed: Duration::ZERO,
        cancelled: Duration::ZERO,
        dead: Duration::ZERO,
        idempotency: Duration::ZERO,
    };
    assert_eq!(
        s.prune(Utc::now() + secs(1), &never, 100).await.unwrap(),
        2,
        "zero retention prunes every finished job"
    );
    for id in &ids {
        assert!(s.get(id.id).await.unwrap().is_none());
    }

    let late = s.enqueue(job("k").delay(Duration::MAX)).await.unwrap();
    assert_eq!(late.state, JobState::Scheduled);
    let late = s.get(late.id).await.unwrap().unwrap();
    assert!(
        late.run_at > Utc::now() + secs(1000 * 365 * 24 * 3600),
        "a delay of Duration::MAX is as late as the store keeps: {}",
        late.run_at
    );
    assert_eq!(s.promote_due(Utc::now(), 100).await.unwrap(), 0, "not due");
    let report = s
        .rescue_expired(
            conveyor_worker::store::EARLIEST,
            &RetryPolicy::default(),
            100,
        )
        .await
        .unwrap();
    assert_eq!(report.retried + report.dead + report.cancelled, 0);
}

/// A new job in `state`, alone in `queue`.
async fn job_in_state(s: &Arc<dyn Store>, queue: &str, state: JobState) -> JobId {
    let later = Utc::now() + secs(3600);
    if state == JobState::Scheduled {
        return s
            .enqueue(job("op").queue(queue).run_at(later))
            .await
            .unwrap()
            .id;
    }
    let id = s.enqueue(job("op").queue(queue)).await.unwrap().id;
    if state == JobState::Available {
        return id;
    }
    let got = fetch(s, queue, 1).await;
    assert_eq!(got.len(), 1, "the job in `{queue}` is claimed");
    let (outcome, run_at) = match state {
        JobState::Running => return id,
        JobState::Retryable => (AttemptOutcome::Failed, Some(later)),
        JobState::Completed => (AttemptOutcome::Completed, None),
        JobState::Cancelled => (AttemptOutcome::Cancelled, None),
        _ => (AttemptOutcome::Failed, None),
    };
    s.finish(vec![finish(&got[0], state, outcome, run_at)])
        .await
        .unwrap();
    assert_eq!(get(s, id).await.state, state);
    id
}

/// Every operator action from every state: the store accepts exactly the states
/// `OperatorAction::from_states` lists, cancel finishes `CANCEL_AT_ONCE` at once and only
/// requests `CANCEL_BY_REQUEST`, and a refusal names the state and the action.
async fn operator_actions_start_from_exactly_their_states(s: Arc<dyn Store>) {
    for action in OperatorAction::ALL {
        for state in JobState::ALL {
            let queue = format!("op-{action}-{state}");
            let id = job_in_state(&s, &queue, state).await;
            let allowed = action.allows(state);
            let by_id = JobFilter {
                ids: vec![id],
                ..JobFilter::default()
            };
            let what = format!("{action} from {state}");
            match action {
                OperatorAction::Retry => {
                    match s.retry(id).await {
                        Ok(job) => {
                            assert!(allowed, "{what} was accepted");
                            assert_eq!((job.state, job.attempt), (JobState::Available, 0));
                        }
                        Err(e) => {
                            assert!(!allowed, "{what} was refused: {e}");
                            assert_refused(&e, id, state, action);
                            assert_eq!(get(&s, id).await.state, state, "{what} changed nothing");
                        }
                    }
                    // The bulk form selects the same states.
                    let id = job_in_state(&s, &format!("{queue}-bulk"), state).await;
                    let by_id = JobFilter {
                        ids: vec![id],
                        ..JobFilter::default()
                    };
                    let n = s.retry_matching(&by_id).await.unwrap();
                    assert_eq!(n, u64::from(allowed), "bulk {what}");
                }
                OperatorAction::Cancel => match s.cancel(id).await {
                    Ok(result) => {
                        assert!(allowed, "{what} was accepted");
                        if OperatorAction::CANCEL_AT_ONCE.contains(&state) {
                            assert_eq!(result, CancelResult::Cancelled, "{what}");
                            assert_eq!(get(&s, id).await.state, JobState::Cancelled);
                        } else {
                            assert!(OperatorAction::CANCEL_BY_REQUEST.contains(&state));
                            assert_eq!(result, CancelResult::Requested, "{what}");
                            let job = get(&s, id).await;
                            assert_eq!(job.state, state);
                            assert!(job.cancel_requested_at.is_some());
                        }
                    }
                    Err(e) => {
                        assert!(!allowed, "{what} was refused: {e}");
                        assert_refused(&e, id, state, action);
                        assert_eq!(get(&s, id).await.state, state, "{what} changed nothing");
                    }
                },
                OperatorAction::Discard => match s.discard(id).await {
                    Ok(()) => {
                        assert!(allowed, "{what} was accepted");
                        assert!(s.get(id).await.unwrap().is_none(), "{what} deleted it");
                    }
                    Err(e) => {
                        assert!(!allowed, "{what} was refused: {e}");
                        assert_refused(&e, id, state, action);
                        assert_eq!(get(&s, id).await.state, state, "{what} changed nothing");
                    }
                },
                OperatorAction::Purge => {
                    let n = s.purge(&by_id).await.unwrap();
                    assert_eq!(n, u64::from(allowed), "{what}");
                    assert_eq!(s.get(id).await.unwrap().is_none(), allowed, "{what}");
                }
            }
        }
    }
}

fn assert_refused(e: &Error, id: JobId, state: JobState, action: OperatorAction) {
    match e {
        Error::WrongState {
            id: refused,
            state: found,
            action: tried,
        } => assert_eq!((*refused, *found, *tried), (id, state, action)),
        other => panic!("{action} from {state}: expected a wrong-state refusal, got {other}"),
    }
    let message = e.to_string();
    assert!(
        message.contains(&format!("cannot {action} a {state} job")),
        "the refusal says what and why: {message}"
    );
}

/// The heartbeat renews the leases of the ids it is given that run under the worker, and no
/// other: a job leased to the worker but no longer held by its runtime expires and is
/// rescued; another worker's job named in the call is left alone.
async fn heartbeat_renews_only_the_jobs_the_worker_holds(s: Arc<dyn Store>) {
    let ids = s
        .enqueue_many((0..3).map(|_| job("k").max_attempts(3)).collect())
        .await
        .unwrap();
    let short = Duration::from_secs(2);
    let claim = |worker: &'static str, n: u32| {
        let s = s.clone();
        async move {
            s.fetch(FetchRequest {
                queue: "default",
                limit: n,
                worker,
                lease: short,
            })
            .await
            .unwrap()
        }
    };
    let mine = claim("w1", 2).await;
    let theirs = claim("w2", 1).await;
    assert_eq!((mine.len(), theirs.len()), (2, 1));
    let (held, dropped) = (mine[0].id, mine[1].id);
    let other = theirs[0].id;
    let before = get(&s, dropped).await.lease_expires_at.unwrap();

    s.heartbeat("w1", &[held, other], Duration::from_secs(3600))
        .await
        .unwrap();
    let renewed = get(&s, held).await.lease_expires_at.unwrap();
    assert!(
        renewed > Utc::now() + secs(3000),
        "the held job is renewed: {renewed}"
    );
    assert_eq!(
        get(&s, dropped).await.lease_expires_at.unwrap(),
        before,
        "a job leased to w1 that w1 no longer holds keeps its deadline"
    );
    assert!(
        get(&s, other).await.lease_expires_at.unwrap() < Utc::now() + secs(10),
        "w2's job is not renewed by w1's heartbeat"
    );
    assert!(s.heartbeat("w1", &[], LEASE).await.unwrap().is_empty());

    // Past the short lease: the dropped job and w2's are rescued, the held one keeps running.
    let at = Utc::now() + secs(60);
    let report = s
        .rescue_expired(at, &RetryPolicy::default(), 100)
        .await
        .unwrap();
    assert_eq!(report.retried, 2);
    assert_eq!(get(&s, dropped).await.state, JobState::Retryable);
    assert_eq!(get(&s, other).await.state, JobState::Retryable);
    let kept = get(&s, held).await;
    assert_eq!(
        (kept.state, kept.lease_owner.as_deref()),
        (JobState::Running, Some("w1"))
    );
    assert_eq!(ids.len(), 3);
}

/// Leases, delays and idempotency windows of zero and of `Duration::MAX`: no panic and no
/// error, instants saturate at the ends the store keeps, and each means what it says.
async fn extreme_leases_delays_and_key_windows(s: Arc<dyn Store>) {
    use conveyor_worker::store::LATEST;
    let far = Utc::now() + secs(1000 * 365 * 24 * 3600);
    let request = |queue: &'static str, lease: Duration| FetchRequest {
        queue,
        limit: 1,
        worker: "w1",
        lease,
    };

    // A zero delay is due now.
    let now_job = s
        .enqueue(job("k").queue("zero").delay(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(now_job.state, JobState::Available);

    // A zero lease has expired as soon as it is taken: the rescuer takes the job back.
    let got = s.fetch(request("zero", Duration::ZERO)).await.unwrap();
    assert_eq!(got.len(), 1);
    let r = s
        .rescue_expired(Utc::now() + secs(1), &RetryPolicy::default(), 10)
        .await
        .unwrap();
    assert_eq!(r.retried, 1, "a zero lease is expired at once");

    // A lease of Duration::MAX lasts as long as the store can say, and so does its renewal.
    s.enqueue(job("k").queue("forever")).await.unwrap();
    let got = s.fetch(request("forever", Duration::MAX)).await.unwrap();
    assert_eq!(got.len(), 1);
    let leased = get(&s, got[0].id).await.lease_expires_at.unwrap();
    assert!(leased > far && leased <= LATEST, "{leased}");
    s.heartbeat("w1", &[got[0].id], Duration::MAX)
        .await
        .unwrap();
    let renewed = get(&s, got[0].id).await.lease_expires_at.unwrap();
    assert!(renewed > far && renewed <= LATEST, "{renewed}");
    let r = s
        .rescue_expired(Utc::now() + secs(3600), &RetryPolicy::default(), 10)
        .await
        .unwrap();
    assert_eq!(
        r.retried + r.dead + r.cancelled,
        0,
        "a MAX lease never expires"
    );
    // A zero renewal ends it now.
    s.heartbeat("w1", &[got[0].id], Duration::ZERO)
        .await
        .unwrap();
    let r = s
        .rescue_expired(Utc::now() + secs(1), &RetryPolicy::default(), 10)
        .await
        .unwrap();
    assert_eq!(r.retried, 1);

    // Keyed finished jobs: an idempotency window of Duration::MAX keeps them past a zero
    // retention; a zero window lets them go.
    let keyed = s
        .enqueue(job("k").queue("keyed").idempotency_key("extreme-1"))
        .await
        .unwrap();
    let got = s.fetch(request("keyed", LEASE)).await.unwrap();
    s.finish(vec![finish(
        &got[0],
        JobState::Completed,
        AttemptOutcome::Completed,
        None,
    )])
    .await
    .unwrap();
    let mut policy = RetentionPolicy {
        completed: Duration::ZERO,
        cancelled: Duration::ZERO,
        dead: Duration::ZERO,
        idempotency: Duration::MAX,
    };
    let later = Utc::now() + secs(1);
    s.prune(later, &policy, 100).await.unwrap();
    assert!(
        s.get(keyed.id).await.unwrap().is_some(),
        "the key's window of Duration::MAX keeps its job"
    );
    let again = s
        .enqueue(job("k").queue("keyed").idempotency_key("extreme-1"))
        .await
        .unwrap();
    assert_eq!((again.id, again.duplicate), (keyed.id, true));
    policy.idempotency = Duration::ZERO;
    s.prune(later, &policy, 100).await.unwrap();
    assert!(
        s.get(keyed.id).await.unwrap().is_none(),
        "a zero window lets it go"
    );
    let fresh = s
        .enqueue(job("k").queue("keyed").idempotency_key("extreme-1"))
        .await
        .unwrap();
    assert!(!fresh.duplicate && fresh.id != keyed.id);
}

backend_tests!(
    extreme_leases_delays_and_key_windows,
    heartbeat_renews_only_the_jobs_the_worker_holds,
    operator_actions_start_from_exactly_their_states,
    extreme_durations_saturate,
    enqueue_now_is_available_and_later_is_scheduled,
    a_delay_is_counted_on_the_store_clock,
    fetch_claims_by_priority_then_run_at_and_sets_the_lease,
    concurrent_fetchers_never_share_a_job,
    leased_to_lists_a_workers_running_jobs_of_one_queue,
    a_large_due_backlog_is_claimed_in_bounded_steps,
    finish_applies_every_outcome,
    stale_outcomes_are_ignored,
    a_retryable_job_runs_again_when_due,
    expired_leases_are_rescued,
    cancel_waiting_and_running_jobs,
    admin_retry_revives_with_a_fresh_budget,
    discard_and_purge,
    idempotency_keys_dedupe_single_and_bulk,
    ids_are_assigned_per_job_or_taken_from_the_caller,
    one_hundred_concurrent_enqueues_make_one_job,
    keys_outlive_the_job_for_their_window,
    retention_prunes_by_state,
    listing_filters_and_pages,
    queue_stats_count_by_state,
    counts_follow_every_transition,
    enqueue_wakes_subscribers,
    backend_reports_its_name_and_health,
);

// The flows production conditions could break, again over TLS to Postgres and Redis and on a
// Postgres database with strict defaults (each Postgres test creates a database: the whole
// suite again would double its time).
conveyor_tests::production_backend_tests!(
    fetch_claims_by_priority_then_run_at_and_sets_the_lease,
    concurrent_fetchers_never_share_a_job,
    finish_applies_every_outcome,
    expired_leases_are_rescued,
    cancel_waiting_and_running_jobs,
    one_hundred_concurrent_enqueues_make_one_job,
    enqueue_wakes_subscribers,
    backend_reports_its_name_and_health,
);
