//! Results, progress and change events on every backend: a result kept with its job (and
//! cleared by an operator retry), progress kept only while its attempt runs, the change
//! events every state change announces, waiting for a job to finish, the change feed's
//! filters and resumption, and the runtime's side (a handler's result, a result over the
//! limit, progress reported while running).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use conveyor_tests::{backend_tests, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::feed::{ChangeFeed, FeedFilter, FeedItem, Subscription};
use conveyor_worker::store::wait::wait_for_end;
use conveyor_worker::store::{FetchRequest, Finish, JobChange, StoreEvent};
use conveyor_worker::{
    AttemptOutcome, AttemptRecord, Job, JobContext, JobId, JobState, NewJob, Outcome, Progress,
    Registry, Store,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(30);

async fn fetch(s: &Arc<dyn Store>, queue: &str, n: u32) -> Vec<Job> {
    s.fetch(FetchRequest {
        queue,
        limit: n,
        worker: "w1",
        lease: LEASE,
    })
    .await
    .expect("fetch works")
}

async fn get(s: &Arc<dyn Store>, id: JobId) -> Job {
    s.get(id).await.expect("get works").expect("job exists")
}

fn done(j: &Job, result: Option<serde_json::Value>) -> Finish {
    let now = Utc::now();
    Finish {
        id: j.id,
        attempt: j.attempt,
        state: JobState::Completed,
        run_at: None,
        attempt_delta: 0,
        record: AttemptRecord {
            attempt: j.attempt,
            started_at: j.attempted_at.unwrap_or(now),
            finished_at: now,
            worker: Some("w1".into()),
            outcome: AttemptOutcome::Completed,
            error: None,
            causes: Vec::new(),
            duration_ms: 1,
            traceback: None,
        },
        result,
    }
}

fn progress(attempt: i32, percent: f32, message: &str) -> Progress {
    Progress {
        attempt,
        percent,
        message: Some(message.into()),
        updated_at: Utc::now(),
    }
}

async fn a_result_is_kept_with_the_job_and_cleared_by_retry(s: Arc<dyn Store>) {
    let ids: Vec<JobId> = s
        .enqueue_many(
            (0..3)
                .map(|i| NewJob::new("r", json!({"i": i})).queue("results"))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let jobs = fetch(&s, "results", 3).await;
    assert_eq!(jobs.len(), 3);
    let by_id = |id: JobId| jobs.iter().find(|j| j.id == id).unwrap();
    let value = json!({"total": 42, "lines": ["a", "b"], "nested": {"ok": true}});
    // A batch mixing an outcome with a result, one without, and a JSON null result.
    let applied = s
        .finish(vec![
            done(by_id(ids[0]), Some(value.clone())),
            done(by_id(ids[1]), None),
            done(by_id(ids[2]), Some(serde_json::Value::Null)),
        ])
        .await
        .unwrap();
    assert_eq!(applied, 3);
    let first = get(&s, ids[0]).await;
    assert_eq!(first.state, JobState::Completed);
    assert_eq!(first.result, Some(value.clone()), "the result round-trips");
    assert_eq!(get(&s, ids[1]).await.result, None, "no result, none kept");
    assert_eq!(
        get(&s, ids[2]).await.result,
        Some(serde_json::Value::Null),
        "a null result is a result"
    );
    // Listing returns it too.
    let listed = s
        .list(
            &conveyor_worker::store::JobFilter {
                ids: vec![ids[0]],
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(listed[0].result, Some(value.clone()));

    // A late outcome (wrong attempt) writes no result.
    s.retry(ids[1]).await.unwrap();
    let again = fetch(&s, "results", 1).await;
    let mut stale = done(&again[0], Some(json!("late")));
    stale.attempt += 5;
    assert_eq!(s.finish(vec![stale]).await.unwrap(), 0);
    assert_eq!(get(&s, ids[1]).await.result, None);

    // An operator retry clears the result of the earlier run.
    let revived = s.retry(ids[0]).await.unwrap();
    assert_eq!(revived.result, None);
    assert_eq!(get(&s, ids[0]).await.result, None);
}

async fn progress_is_kept_only_while_its_attempt_runs(s: Arc<dyn Store>) {
    let id = s
        .enqueue(NewJob::new("p", json!({})).queue("progress"))
        .await
        .unwrap()
        .id;
    assert!(
        !s.report_progress(id, &progress(1, 10.0, "too early"))
            .await
            .unwrap(),
        "a waiting job takes no progress"
    );
    let running = fetch(&s, "progress", 1).await.remove(0);
    assert!(
        s.report_progress(id, &progress(running.attempt, 50.0, "halfway"))
            .await
            .unwrap()
    );
    let seen = get(&s, id).await.progress.expect("progress is kept");
    assert_eq!(
        (seen.attempt, seen.percent, seen.message.as_deref()),
        (running.attempt, 50.0, Some("halfway"))
    );
    assert!(
        !s.report_progress(id, &progress(running.attempt + 1, 60.0, "other attempt"))
            .await
            .unwrap(),
        "a report for another attempt changes nothing"
    );
    s.finish(vec![done(&running, None)]).await.unwrap();
    assert!(
        !s.report_progress(id, &progress(running.attempt, 99.0, "after the end"))
            .await
            .unwrap(),
        "a finished job takes no progress"
    );
    assert_eq!(get(&s, id).await.progress.unwrap().percent, 50.0);
    // An operator retry clears it.
    assert_eq!(s.retry(id).await.unwrap().progress, None);
}

/// Collects change events until `done` says the list is complete, or panics after 10 s.
async fn changes_until(
    events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
    mut done: impl FnMut(&[JobChange]) -> bool,
) -> Vec<JobChange> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if done(&seen) {
            return seen;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => panic!("timed out; changes seen: {seen:?}"),
            Ok(Ok(StoreEvent::JobsChanged { changes })) => seen.extend(changes.iter().copied()),
            Ok(Err(e)) => panic!("events failed: {e:?}"),
            Ok(Ok(_)) => {}
        }
    }
}

async fn every_state_change_is_announced(s: Arc<dyn Store>) {
    let mut events = s.subscribe();
    let a = s
        .enqueue(NewJob::new("e", json!({})).queue("announce"))
        .await
        .unwrap()
        .id;
    let b = s
        .enqueue(NewJob::new("e", json!({})).queue("announce-b"))
        .await
        .unwrap()
        .id;
    let running = fetch(&s, "announce", 1).await.remove(0);
    s.finish(vec![done(&running, Some(json!(1)))])
        .await
        .unwrap();
    s.cancel(b).await.unwrap();
    let expected = [
        JobChange {
            id: a,
            state: JobState::Available,
        },
        JobChange {
            id: a,
            state: JobState::Running,
        },
        JobChange {
            id: a,
            state: JobState::Completed,
        },
        JobChange {
            id: b,
            state: JobState::Available,
        },
        JobChange {
            id: b,
            state: JobState::Cancelled,
        },
    ];
    let seen = changes_until(&mut events, |seen| {
        expected.iter().all(|e| seen.contains(e))
    })
    .await;
    // Each job's changes arrive in the order they were made.
    let order: Vec<JobState> = seen.iter().filter(|c| c.id == a).map(|c| c.state).collect();
    assert_eq!(
        order,
        [JobState::Available, JobState::Running, JobState::Completed]
    );
}

async fn waiting_ends_when_the_job_finishes_or_at_the_deadline(s: Arc<dyn Store>) {
    let id = s
        .enqueue(NewJob::new("w", json!({})).queue("wait"))
        .await
        .unwrap()
        .id;
    let running = fetch(&s, "wait", 1).await.remove(0);
    let finisher = {
        let s = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            s.finish(vec![done(&running, Some(json!({"answer": 42})))])
                .await
                .unwrap();
        })
    };
    let started = Instant::now();
    let job = wait_for_end(s.as_ref(), id, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    finisher.await.unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.result, Some(json!({"answer": 42})));
    assert!(
        took < Duration::from_secs(15),
        "the wait ends when the job finishes, not at its deadline: {took:?}"
    );

    // A job that does not finish: the answer comes at the deadline, with its state then.
    let other = s
        .enqueue(NewJob::new("w", json!({})).queue("wait-never"))
        .await
        .unwrap()
        .id;
    let started = Instant::now();
    let job = wait_for_end(s.as_ref(), other, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(job.state, JobState::Available);

    // A finished job answers at once; a missing one is None; too long a wait is refused.
    let started = Instant::now();
    let job = wait_for_end(s.as_ref(), id, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        wait_for_end(s.as_ref(), JobId::new(), Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
    let err = wait_for_end(s.as_ref(), id, Duration::from_secs(61))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid wait") && err.contains("60s"), "{err}");
}

async fn next_change(sub: &mut Subscription) -> FeedItem {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a change arrives within 10 s")
        .expect("the feed runs")
}

async fn the_feed_filters_and_resumes(s: Arc<dyn Store>) {
    let feed = ChangeFeed::new(s.clone());
    let filter = FeedFilter {
        queue: Some("feed-a".into()),
        kind: Some("k1".into()),
        tag: None,
    };
    let mut sub = feed.subscribe(filter.clone(), None);
    let mut by_tag = feed.subscribe(
        FeedFilter {
            tag: Some("vip".into()),
            ..FeedFilter::default()
        },
        None,
    );
    // Only `wanted` matches the queue and kind; only `tagged` has the tag.
    let other_queue = s
        .enqueue(NewJob::new("k1", json!({})).queue("feed-b"))
        .await
        .unwrap()
        .id;
    let other_kind = s
        .enqueue(NewJob::new("k2", json!({})).queue("feed-a"))
        .await
        .unwrap()
        .id;
    let tagged = s
        .enqueue(NewJob::new("k3", json!({})).queue("feed-c").tags(["vip"]))
        .await
        .unwrap()
        .id;
    let wanted = s
        .enqueue(NewJob::new("k1", json!({})).queue("feed-a"))
        .await
        .unwrap()
        .id;
    let mut finishes = Vec::new();
    for q in ["feed-b", "feed-a", "feed-c"] {
        for j in fetch(&s, q, 10).await {
            finishes.push(done(&j, None));
        }
    }
    assert_eq!(finishes.len(), 4);
    s.finish(finishes).await.unwrap();

    let mut got = Vec::new();
    while got.len() < 3 {
        match next_change(&mut sub).await {
            FeedItem::Change(e) => got.push(e),
            FeedItem::Reset { reason } => panic!("unexpected reset: {reason}"),
        }
    }
    assert!(
        got.iter().all(|e| e.id == wanted),
        "only the matching job: {got:?} (others: {other_queue}, {other_kind}, {tagged})"
    );
    assert_eq!(
        got.iter().map(|e| e.state).collect::<Vec<_>>(),
        [JobState::Available, JobState::Running, JobState::Completed]
    );
    assert_eq!(
        (got[0].queue.as_str(), got[0].kind.as_str()),
        ("feed-a", "k1")
    );
    let mut vip = Vec::new();
    while vip.len() < 3 {
        match next_change(&mut by_tag).await {
            FeedItem::Change(e) => vip.push(e),
            FeedItem::Reset { reason } => panic!("unexpected reset: {reason}"),
        }
    }
    assert!(vip.iter().all(|e| e.id == tagged), "{vip:?}");

    // Resuming after the first change replays only the later ones.
    let mut resumed = feed.subscribe(filter.clone(), Some(&got[0].event_id));
    for expected in &got[1..] {
        match next_change(&mut resumed).await {
            FeedItem::Change(e) => assert_eq!(e.event_id, expected.event_id),
            FeedItem::Reset { reason } => panic!("unexpected reset: {reason}"),
        }
    }
    // Ids order as the changes came.
    let seq = |e: &str| e.rsplit_once('-').unwrap().1.parse::<u64>().unwrap();
    assert!(seq(&got[0].event_id) < seq(&got[1].event_id));
    assert!(seq(&got[1].event_id) < seq(&got[2].event_id));

    // An id this feed never gave: a reset first, then live changes.
    let mut stranger = feed.subscribe(filter.clone(), Some("0badfeed-7"));
    match next_change(&mut stranger).await {
        FeedItem::Reset { reason } => assert!(reason.contains("0badfeed-7"), "{reason}"),
        other => panic!("expected a reset, got {other:?}"),
    }
    let late = s
        .enqueue(NewJob::new("k1", json!({})).queue("feed-a"))
        .await
        .unwrap()
        .id;
    match next_change(&mut stranger).await {
        FeedItem::Change(e) => assert_eq!((e.id, e.state), (late, JobState::Available)),
        other => panic!("expected the new job, got {other:?}"),
    }
    let bad = FeedFilter {
        queue: Some("no spaces".into()),
        ..FeedFilter::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("queue"));
}

fn worker_config(queue: &str, max_result_bytes: usize) -> WorkerConfig {
    WorkerConfig {
        queues: vec![QueueConfig {
            name: queue.into(),
            concurrency: 4,
        }],
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        max_result_bytes,
        ..WorkerConfig::default()
    }
}

async fn wait_for_state(s: &Arc<dyn Store>, id: JobId, state: JobState) -> Job {
    eventually(20, &format!("job {id} to become {state}"), || {
        let s = s.clone();
        async move {
            let j = s.get(id).await.unwrap()?;
            (j.state == state).then_some(j)
        }
    })
    .await
}

async fn a_handlers_result_is_kept_and_one_over_the_limit_fails_the_attempt(s: Arc<dyn Store>) {
    let mut registry = Registry::new();
    registry.register(
        "sum",
        |args: serde_json::Value, _ctx: JobContext| async move {
            let total: i64 = args["n"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_i64()).sum())
                .unwrap_or(0);
            Ok(Outcome::done_with(&json!({"total": total}))?)
        },
    );
    registry.register(
        "huge",
        |_: serde_json::Value, _ctx: JobContext| async move {
            Ok(Outcome::done_with(&"x".repeat(500))?)
        },
    );
    let worker = Worker::new(s.clone(), registry, worker_config("res", 256)).unwrap();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));

    let sum = s
        .enqueue(NewJob::new("sum", json!({"n": [1, 2, 3]})).queue("res"))
        .await
        .unwrap()
        .id;
    let huge = s
        .enqueue(NewJob::new("huge", json!({})).queue("res").max_attempts(1))
        .await
        .unwrap()
        .id;
    let sum = wait_for_state(&s, sum, JobState::Completed).await;
    assert_eq!(sum.result, Some(json!({"total": 6})));
    let huge = wait_for_state(&s, huge, JobState::Dead).await;
    assert_eq!(huge.result, None, "nothing is kept, not even a part");
    let attempt = huge.attempts.last().unwrap();
    assert_eq!(attempt.outcome, AttemptOutcome::Failed);
    let error = attempt.error.as_deref().unwrap();
    assert!(
        error.contains("502 bytes") && error.contains("over the limit of 256 bytes"),
        "{error}"
    );
    assert!(error.contains("worker.max_result_bytes"), "{error}");
    stop.cancel();
    handle.await.unwrap().unwrap();
}

async fn progress_is_visible_while_the_job_runs(s: Arc<dyn Store>) {
    let release = CancellationToken::new();
    let mut registry = Registry::new();
    {
        let release = release.clone();
        registry.register("slow", move |_: serde_json::Value, ctx: JobContext| {
            let release = release.clone();
            async move {
                // Many reports in a burst: throttled, the last one wins.
                for i in 0..=40 {
                    ctx.progress(i as f32, Some(format!("step {i} of 80")));
                }
                release.cancelled().await;
                Ok(Outcome::Done)
            }
        });
    }
    let worker = Worker::new(s.clone(), registry, worker_config("prog", 1024)).unwrap();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    let id = s
        .enqueue(NewJob::new("slow", json!({})).queue("prog"))
        .await
        .unwrap()
        .id;
    let seen = eventually(20, "progress 40 while the job runs", || {
        let s = s.clone();
        async move {
            let j = s.get(id).await.unwrap()?;
            let p = j.progress.clone()?;
            (p.percent == 40.0).then_some(j)
        }
    })
    .await;
    assert_eq!(seen.state, JobState::Running);
    let p = seen.progress.unwrap();
    assert_eq!(
        (p.attempt, p.message.as_deref()),
        (1, Some("step 40 of 80"))
    );
    release.cancel();
    wait_for_state(&s, id, JobState::Completed).await;
    stop.cancel();
    handle.await.unwrap().unwrap();
}

backend_tests!(
    a_result_is_kept_with_the_job_and_cleared_by_retry,
    progress_is_kept_only_while_its_attempt_runs,
    every_state_change_is_announced,
    waiting_ends_when_the_job_finishes_or_at_the_deadline,
    the_feed_filters_and_resumes,
    a_handlers_result_is_kept_and_one_over_the_limit_fails_the_attempt,
    progress_is_visible_while_the_job_runs,
);
