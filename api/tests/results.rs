//! Results, progress, `?wait=` and the job event stream over HTTP, on every backend, through
//! the Rust client: a result and progress in `GET /v1/jobs/{id}`, a long poll that answers
//! when the job finishes or at its deadline, bad waits refused, a filtered event stream that
//! sees a matching job go available → running → completed and nothing else, resumption with
//! `Last-Event-ID`, and (Postgres) a second API server on the same database that sees the
//! changes the first one's store made.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Server, send};
use conveyor_api::key::Scope;
use conveyor_client::{Client, ClientEvent, EventFilter, Events, JobEvent};
use conveyor_worker::store::{FetchRequest, Finish};
use conveyor_worker::{
    AttemptOutcome, AttemptRecord, Job, JobArgs, JobState, NewJob, Progress, Store,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;

api_tests!(
    results_and_progress_show_in_the_job,
    wait_answers_when_the_job_finishes_or_at_the_deadline,
    the_event_stream_filters_and_resumes,
);

#[derive(Serialize, Deserialize)]
struct Sum {
    n: Vec<i64>,
}

impl JobArgs for Sum {
    const KIND: &'static str = "sum";
}

async fn claim(store: &Arc<dyn Store>, queue: &str) -> Job {
    store
        .fetch(FetchRequest {
            queue,
            limit: 1,
            worker: "w1",
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap()
        .pop()
        .expect("a job to claim")
}

fn completed(j: &Job, result: Option<serde_json::Value>) -> Finish {
    let now = Utc::now();
    Finish {
        id: j.id,
        attempt: j.attempt,
        state: JobState::Completed,
        run_at: None,
        attempt_delta: 0,
        record: AttemptRecord {
            attempt: j.attempt,
            started_at: now,
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

async fn results_and_progress_show_in_the_job(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let read = s.key(Scope::Read).await;
    let id = store
        .enqueue(NewJob::new("sum", json!({})).queue("shown"))
        .await
        .unwrap()
        .id;
    let running = claim(&store, "shown").await;
    store
        .report_progress(
            id,
            &Progress {
                attempt: running.attempt,
                percent: 25.0,
                message: Some("a quarter".into()),
                updated_at: Utc::now(),
            },
        )
        .await
        .unwrap();
    let (status, job) = send(s.req(Method::GET, &format!("/v1/jobs/{id}"), Some(&read))).await;
    assert_eq!(status, 200);
    assert_eq!(job["state"], "running");
    assert_eq!(job["progress"]["percent"], 25.0);
    assert_eq!(job["progress"]["message"], "a quarter");
    assert_eq!(job["progress"]["attempt"], 1);
    assert!(job.get("result").is_none(), "no result yet: {job}");
    store
        .finish(vec![completed(&running, Some(json!({"total": 3})))])
        .await
        .unwrap();
    let (_, job) = send(s.req(Method::GET, &format!("/v1/jobs/{id}"), Some(&read))).await;
    assert_eq!(job["result"], json!({"total": 3}));
}

async fn wait_answers_when_the_job_finishes_or_at_the_deadline(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let admin = s.key(Scope::Admin).await;
    let read = s.key(Scope::Read).await;
    let client = Client::new(&s.base, &admin).unwrap();

    // Enqueue over HTTP and wait; a worker stand-in finishes the job half a second later.
    let finisher = {
        let store = store.clone();
        tokio::spawn(async move {
            let running = conveyor_tests::eventually(10, "the job to be claimable", || {
                let store = store.clone();
                async move {
                    store
                        .fetch(FetchRequest {
                            queue: "default",
                            limit: 1,
                            worker: "w1",
                            lease: Duration::from_secs(30),
                        })
                        .await
                        .unwrap()
                        .pop()
                }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            store
                .finish(vec![completed(&running, Some(json!({"total": 6})))])
                .await
                .unwrap();
        })
    };
    let started = Instant::now();
    let job = client
        .enqueue(Sum { n: vec![1, 2, 3] })
        .send_and_wait(Duration::from_secs(30))
        .await
        .unwrap();
    let took = started.elapsed();
    finisher.await.unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.result, Some(json!({"total": 6})));
    assert!(
        took < Duration::from_secs(15),
        "answered when the job finished, not at the deadline: {took:?}"
    );

    // A job nobody runs: the answer comes at the deadline, 200 with its state then.
    let waiting = store
        .enqueue(NewJob::new("sum", json!({})).queue("nobody"))
        .await
        .unwrap()
        .id;
    let started = Instant::now();
    let (status, job) = send(s.req(
        Method::GET,
        &format!("/v1/jobs/{waiting}?wait=1s"),
        Some(&read),
    ))
    .await;
    assert_eq!((status, job["state"].as_str()), (200, Some("available")));
    assert!(started.elapsed() >= Duration::from_secs(1));
    let job = client
        .wait(waiting, Duration::from_millis(1500))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Available);

    // Bad waits name the field.
    for bad in [
        "61s", "2m", "soon", "-1", "%205s", "1h", "5us", "1m%201s", "s",
    ] {
        let (status, p) = send(s.req(
            Method::GET,
            &format!("/v1/jobs/{waiting}?wait={bad}"),
            Some(&read),
        ))
        .await;
        assert_eq!(status, 422, "wait={bad}: {p}");
        assert_eq!(p["errors"][0]["field"], "wait", "wait={bad}: {p}");
    }
    let (status, _) = send(s.req(
        Method::GET,
        &format!("/v1/jobs/{}?wait=5s", conveyor_worker::JobId::new()),
        Some(&read),
    ))
    .await;
    assert_eq!(status, 404);
    // An enqueue key reads nothing, waiting included.
    let enqueue = s.key(Scope::Enqueue).await;
    let (status, _) = send(s.req(
        Method::GET,
        &format!("/v1/jobs/{waiting}?wait=1s"),
        Some(&enqueue),
    ))
    .await;
    assert_eq!(status, 403);
}

async fn next_job(events: &mut Events) -> JobEvent {
    match tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream is open")
        .expect("a readable event")
    {
        ClientEvent::Job(e) => e,
        ClientEvent::Reset { reason } => panic!("unexpected reset: {reason}"),
    }
}

/// Enqueues a job on `queue`, claims it and completes it through `store`.
async fn run_one(store: &Arc<dyn Store>, queue: &str, kind: &str) -> conveyor_worker::JobId {
    let id = store
        .enqueue(NewJob::new(kind, json!({})).queue(queue))
        .await
        .unwrap()
        .id;
    let running = claim(store, queue).await;
    assert_eq!(running.id, id);
    store.finish(vec![completed(&running, None)]).await.unwrap();
    id
}

async fn the_event_stream_filters_and_resumes(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let read = s.key(Scope::Read).await;
    let client = Client::new(&s.base, &read).unwrap();
    let filter = EventFilter::default().queue("stream-a").kind("k1");
    let mut events = client.events(filter.clone(), None).await.unwrap();

    // Only the job of queue stream-a and kind k1 is streamed.
    run_one(&store, "stream-b", "k1").await;
    run_one(&store, "stream-a", "k2").await;
    let wanted = run_one(&store, "stream-a", "k1").await;
    let got = [
        next_job(&mut events).await,
        next_job(&mut events).await,
        next_job(&mut events).await,
    ];
    for e in &got {
        assert_eq!(
            (e.id, e.queue.as_str(), e.kind.as_str()),
            (wanted, "stream-a", "k1")
        );
    }
    assert_eq!(
        got.iter().map(|e| e.state).collect::<Vec<_>>(),
        [JobState::Available, JobState::Running, JobState::Completed]
    );
    // Nothing else is pending: the next event is a later job's.
    let later = run_one(&store, "stream-a", "k1").await;
    assert_eq!(next_job(&mut events).await.id, later);
    drop(events);

    // Resuming after the first change replays the two after it, then goes on live.
    let mut resumed = client
        .events(filter.clone(), Some(&got[0].event_id))
        .await
        .unwrap();
    assert_eq!(next_job(&mut resumed).await.event_id, got[1].event_id);
    assert_eq!(next_job(&mut resumed).await.event_id, got[2].event_id);
    let e = next_job(&mut resumed).await;
    assert_eq!((e.id, e.state), (later, JobState::Available));

    // An id from another server: a reset first.
    let mut stranger = client
        .events(filter.clone(), Some("0badfeed-12"))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), stranger.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        ClientEvent::Reset { reason } => assert!(reason.contains("0badfeed-12"), "{reason}"),
        other => panic!("expected a reset, got {other:?}"),
    }

    // Bad filters are 422; an enqueue key is refused.
    let (status, p) = send(s.req(
        Method::GET,
        "/v1/jobs/events?queue=no%20spaces",
        Some(&read),
    ))
    .await;
    assert_eq!(
        (status, p["errors"][0]["field"].as_str()),
        (422, Some("queue"))
    );
    let enqueue = s.key(Scope::Enqueue).await;
    let err = Client::new(&s.base, &enqueue)
        .unwrap()
        .events(EventFilter::default(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("403"), "{err}");
}

/// Two API servers on one Postgres database, each with its own store (as two replicas have):
/// the second streams and long-polls changes that only the first's store made, which reach
/// it through Postgres NOTIFY alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_postgres_sees_the_first_ones_changes() {
    let Some(t) = conveyor_tests::TestStore::postgres().await else {
        return;
    };
    let first = t.store.clone();
    let second = conveyor_worker::store::connect(&t.url, Default::default())
        .await
        .unwrap();
    let s = Server::default(second.clone()).await;
    let read = s.key(Scope::Read).await;
    let client = Client::new(&s.base, &read).unwrap();
    let mut events = client
        .events(EventFilter::default().queue("replicas"), None)
        .await
        .unwrap();
    let id = first
        .enqueue(NewJob::new("k", json!({})).queue("replicas"))
        .await
        .unwrap()
        .id;
    let running = claim(&first, "replicas").await;
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.wait(id, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    first
        .finish(vec![completed(&running, Some(json!("done elsewhere")))])
        .await
        .unwrap();
    let job = waiter.await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.result, Some(json!("done elsewhere")));
    assert!(started.elapsed() < Duration::from_secs(15));
    // Another process's claim is not announced across processes (decision 0006): the
    // second server sees the enqueue and the outcome, each once.
    let states: Vec<JobState> = [next_job(&mut events).await, next_job(&mut events).await]
        .iter()
        .map(|e| {
            assert_eq!(e.id, id);
            e.state
        })
        .collect();
    assert_eq!(states, [JobState::Available, JobState::Completed]);
    drop(events);
    drop(s);
    t.cleanup().await;
}
