//! Remote workers through a real API server on `127.0.0.1:0`, on every backend: claim and
//! complete, fail with a traceback, permanent failure, snooze, a lease that expires and is
//! rescued (the first worker's late outcome refused), the key's queues, the worker scope's
//! reach, the long-poll's wake-up, results and progress, and bad input.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Server, send};
use conveyor_api::audit::Actor;
use conveyor_api::key::{self, Scope};
use conveyor_worker::{AttemptOutcome, JobId, JobState, NewJob, RetryPolicy, Store};
use reqwest::Method;
use serde_json::{Value, json};

api_tests!(
    claim_and_complete,
    fail_keeps_the_traceback_and_retries,
    permanent_failure_and_exhausted_attempts_are_dead,
    snooze_does_not_use_an_attempt,
    a_rescued_lease_refuses_the_late_outcome,
    a_worker_key_claims_only_from_its_queues,
    a_worker_key_reaches_only_the_worker_routes,
    a_waiting_claim_wakes_on_enqueue,
    results_and_progress_follow_the_lease,
    bad_input_names_the_field,
);

async fn enqueue(store: &Arc<dyn Store>, queue: &str, max_attempts: i32) -> JobId {
    store
        .enqueue(
            NewJob::new("remote.echo", json!({"n": 1}))
                .queue(queue)
                .max_attempts(max_attempts),
        )
        .await
        .unwrap()
        .id
}

async fn claim(s: &Server, key: &str, body: Value) -> Vec<Value> {
    let (status, answer) = send(
        s.req(Method::POST, "/v1/workers/claim", Some(key))
            .json(&body),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer["jobs"].as_array().unwrap().clone()
}

async fn post(s: &Server, key: &str, path: &str, body: Value) -> (u16, Value) {
    send(s.req(Method::POST, path, Some(key)).json(&body)).await
}

async fn claim_and_complete(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(enqueue(&store, "mail", 5).await);
    }
    let jobs = claim(
        &s,
        &key,
        json!({"worker_id": "w1", "queues": ["mail"], "limit": 10}),
    )
    .await;
    assert_eq!(jobs.len(), 3);
    for j in &jobs {
        assert_eq!(j["attempt"], 1);
        assert_eq!(j["kind"], "remote.echo");
        assert_eq!(j["args"], json!({"n": 1}));
        assert_eq!(j["queue"], "mail");
        assert_eq!(j["max_attempts"], 5);
        assert!(j["lease_expires_at"].is_string(), "{j}");
    }
    let running = store.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(running.state, JobState::Running);
    assert_eq!(running.lease_owner.as_deref(), Some("w1"));
    // Nothing more is due.
    assert!(
        claim(&s, &key, json!({"worker_id": "w1", "queues": ["mail"]}))
            .await
            .is_empty()
    );

    let path = format!("/v1/workers/jobs/{}/complete", ids[0]);
    let (status, answer) = post(&s, &key, &path, json!({"worker_id": "w1", "attempt": 1})).await;
    assert_eq!(
        (status, answer["state"].as_str()),
        (200, Some("completed")),
        "{answer}"
    );
    let done = store.get(ids[0]).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].worker.as_deref(), Some("w1"));
    assert_eq!(done.attempts[0].outcome, AttemptOutcome::Completed);
    // The same outcome again: refused, nothing changes.
    let (status, answer) = post(&s, &key, &path, json!({"worker_id": "w1", "attempt": 1})).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("completed"),
        "{answer}"
    );
    assert_eq!(store.get(ids[0]).await.unwrap().unwrap(), done);
    // Another worker cannot complete w1's jobs.
    let path = format!("/v1/workers/jobs/{}/complete", ids[1]);
    let (status, answer) = post(&s, &key, &path, json!({"worker_id": "w2", "attempt": 1})).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(
        store.get(ids[1]).await.unwrap().unwrap().state,
        JobState::Running
    );
    // A job that does not exist.
    let path = format!("/v1/workers/jobs/{}/complete", JobId::new());
    let (status, _) = post(&s, &key, &path, json!({"worker_id": "w1", "attempt": 1})).await;
    assert_eq!(status, 404);

    // The batch: two applied, one already finished, one unknown.
    let unknown = JobId::new();
    let (status, answer) = post(
        &s,
        &key,
        "/v1/workers/finish",
        json!({"worker_id": "w1", "items": [
            {"id": ids[1], "attempt": 1, "outcome": "complete"},
            {"id": ids[2], "attempt": 1, "outcome": "complete"},
            {"id": ids[0], "attempt": 1, "outcome": "complete"},
            {"id": unknown, "attempt": 1, "outcome": "complete"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let statuses: Vec<u64> = answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 409, 404], "{answer}");
    assert_eq!(answer["items"][0]["state"], "completed");
    for id in &ids {
        assert_eq!(
            store.get(*id).await.unwrap().unwrap().state,
            JobState::Completed
        );
    }

    // The remote worker is among the registrations, with its queue and no kinds.
    let read = s.key(Scope::Read).await;
    let (status, workers) = send(s.req(Method::GET, "/v1/workers", Some(&read))).await;
    assert_eq!(status, 200);
    let w1 = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "w1")
        .unwrap_or_else(|| panic!("w1 not registered: {workers}"));
    assert_eq!(w1["queues"][0]["name"], "mail", "{w1}");
    assert_eq!(w1["host"], "127.0.0.1", "{w1}");
    let registrations = conveyor_admin::serving::Serving::read(store.as_ref())
        .await
        .unwrap();
    let reg = registrations.workers.iter().find(|w| w.id == "w1").unwrap();
    assert_eq!(reg.kinds, None, "a remote worker's kinds are unknown");
}

async fn fail_keeps_the_traceback_and_retries(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let id = enqueue(&store, "q", 3).await;
    let jobs = claim(&s, &key, json!({"worker_id": "py-1", "queues": ["q"]})).await;
    assert_eq!(jobs.len(), 1);
    let traceback = "Traceback (most recent call last):\n  File \"app.py\", line 3, in handle\nValueError: boom";
    let before = Utc::now();
    let (status, answer) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{id}/fail"),
        json!({"worker_id": "py-1", "attempt": 1,
               "error": {"message": "ValueError: boom", "causes": ["KeyError: 'x'"], "traceback": traceback},
               "retry_after_seconds": 120}),
    )
    .await;
    assert_eq!(
        (status, answer["state"].as_str()),
        (200, Some("retryable")),
        "{answer}"
    );
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Retryable);
    let wait = (job.run_at - before).num_seconds();
    assert!(
        (119..=121).contains(&wait),
        "retry_after_seconds sets the delay: {wait}"
    );
    // Through the API, as an operator reads it.
    let admin = s.key(Scope::Admin).await;
    let (status, view) = send(s.req(Method::GET, &format!("/v1/jobs/{id}"), Some(&admin))).await;
    assert_eq!(status, 200);
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["outcome"], "failed", "{view}");
    assert_eq!(attempt["error"], "ValueError: boom");
    assert_eq!(attempt["causes"], json!(["KeyError: 'x'"]));
    assert_eq!(attempt["traceback"], traceback);
    assert_eq!(attempt["worker"], "py-1");

    // Without a delay: the default backoff (seconds, not the 120 above).
    store.retry(id).await.unwrap();
    let jobs = claim(&s, &key, json!({"worker_id": "py-1", "queues": ["q"]})).await;
    let attempt = jobs[0]["attempt"].as_i64().unwrap();
    let (status, answer) = post(
        &s,
        &key,
        "/v1/workers/finish",
        json!({"worker_id": "py-1", "items": [{"id": id, "attempt": attempt, "outcome": "fail",
               "error": {"message": "again"}}]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["items"][0]["state"], "retryable", "{answer}");
    let job = store.get(id).await.unwrap().unwrap();
    assert!(
        (job.run_at - Utc::now()).num_seconds() < 60,
        "{}",
        job.run_at
    );
    assert_eq!(job.attempts.last().unwrap().traceback, None);
}

async fn permanent_failure_and_exhausted_attempts_are_dead(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let permanent = enqueue(&store, "q", 10).await;
    let last = enqueue(&store, "q", 1).await;
    let jobs = claim(
        &s,
        &key,
        json!({"worker_id": "w", "queues": ["q"], "limit": 2}),
    )
    .await;
    assert_eq!(jobs.len(), 2);
    let (status, answer) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{permanent}/fail"),
        json!({"worker_id": "w", "attempt": 1, "error": {"message": "bad args"}, "retryable": false}),
    )
    .await;
    assert_eq!(
        (status, answer["state"].as_str()),
        (200, Some("dead")),
        "{answer}"
    );
    let (status, answer) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{last}/fail"),
        json!({"worker_id": "w", "attempt": 1, "error": {"message": "flaky"}}),
    )
    .await;
    assert_eq!(
        (status, answer["state"].as_str()),
        (200, Some("dead")),
        "{answer}"
    );
    for id in [permanent, last] {
        let job = store.get(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Dead);
        assert!(job.finalized_at.is_some());
    }
}

async fn snooze_does_not_use_an_attempt(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let id = enqueue(&store, "q", 1).await;
    claim(&s, &key, json!({"worker_id": "w", "queues": ["q"]})).await;
    let before = Utc::now();
    let (status, answer) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{id}/snooze"),
        json!({"worker_id": "w", "attempt": 1, "seconds": 30}),
    )
    .await;
    assert_eq!(
        (status, answer["state"].as_str()),
        (200, Some("scheduled")),
        "{answer}"
    );
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Scheduled);
    assert_eq!(job.attempt, 0, "the snoozed attempt does not count");
    assert_eq!(job.attempts[0].outcome, AttemptOutcome::Snoozed);
    let wait = (job.run_at - before).num_seconds();
    assert!((29..=31).contains(&wait), "{wait}");
    // With one attempt allowed, the job still runs after a snooze (batch form).
    store.retry(id).await.unwrap();
    let jobs = claim(&s, &key, json!({"worker_id": "w", "queues": ["q"]})).await;
    assert_eq!(jobs[0]["attempt"], 1);
    let (status, answer) = post(
        &s,
        &key,
        "/v1/workers/finish",
        json!({"worker_id": "w", "items": [{"id": id, "attempt": 1, "outcome": "snooze", "seconds": 0}]}),
    )
    .await;
    assert_eq!(
        (status, answer["items"][0]["state"].as_str()),
        (200, Some("scheduled")),
        "{answer}"
    );
}

async fn a_rescued_lease_refuses_the_late_outcome(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let id = enqueue(&store, "q", 5).await;
    let jobs = claim(
        &s,
        &key,
        json!({"worker_id": "slow", "queues": ["q"], "lease_seconds": 1}),
    )
    .await;
    assert_eq!(jobs.len(), 1);
    // The worker stops heartbeating; the ordinary rescue ends its lease.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let no_backoff = RetryPolicy {
        base: Duration::ZERO,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let now = store.now().await.unwrap();
    let report = store.rescue_expired(now, &no_backoff, 100).await.unwrap();
    assert_eq!(report.retried, 1);
    store
        .promote_due(store.now().await.unwrap(), 100)
        .await
        .unwrap();
    let jobs = claim(&s, &key, json!({"worker_id": "fast", "queues": ["q"]})).await;
    assert_eq!(jobs.len(), 1, "the rescued job is claimed again");
    assert_eq!(jobs[0]["attempt"], 2);
    let leased = store.get(id).await.unwrap().unwrap();

    // The first worker's late outcomes: refused, and nothing changes.
    let (status, answer) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{id}/complete"),
        json!({"worker_id": "slow", "attempt": 1}),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("fast"),
        "{answer}"
    );
    let (status, answer) = post(
        &s,
        &key,
        "/v1/workers/finish",
        json!({"worker_id": "slow", "items": [{"id": id, "attempt": 1, "outcome": "fail", "error": {"message": "late"}}]}),
    )
    .await;
    assert_eq!(
        (status, answer["items"][0]["status"].as_u64()),
        (200, Some(409)),
        "{answer}"
    );
    assert_eq!(
        store.get(id).await.unwrap().unwrap(),
        leased,
        "the late outcomes changed nothing"
    );
    // Its heartbeat says the job is lost; the new holder's renews.
    let (status, beat) = post(
        &s,
        &key,
        "/v1/workers/heartbeat",
        json!({"worker_id": "slow", "job_ids": [id]}),
    )
    .await;
    assert_eq!(status, 200, "{beat}");
    assert_eq!(
        (beat["renewed"].clone(), beat["lost"][0].clone()),
        (json!([]), json!(id))
    );
    let (_, beat) = post(
        &s,
        &key,
        "/v1/workers/heartbeat",
        json!({"worker_id": "fast", "job_ids": [id], "lease_seconds": 600}),
    )
    .await;
    assert_eq!(beat["renewed"], json!([id]), "{beat}");
    let renewed = store.get(id).await.unwrap().unwrap();
    assert!(renewed.lease_expires_at.unwrap() > Utc::now() + chrono::Duration::seconds(500));
    let (status, answer) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{id}/complete"),
        json!({"worker_id": "fast", "attempt": 2}),
    )
    .await;
    assert_eq!(
        (status, answer["state"].as_str()),
        (200, Some("completed")),
        "{answer}"
    );
    let outcomes: Vec<AttemptOutcome> = store
        .get(id)
        .await
        .unwrap()
        .unwrap()
        .attempts
        .iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [AttemptOutcome::LeaseExpired, AttemptOutcome::Completed]
    );
}

async fn results_and_progress_follow_the_lease(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let read = s.key(Scope::Read).await;
    let ids = [
        enqueue(&store, "res", 5).await,
        enqueue(&store, "res", 5).await,
        enqueue(&store, "res", 5).await,
    ];
    let jobs = claim(
        &s,
        &key,
        json!({"worker_id": "w1", "queues": ["res"], "limit": 10}),
    )
    .await;
    assert_eq!(jobs.len(), 3);

    // Progress: recorded for the lease holder, shown on the job, refused for anyone else.
    let path = format!("/v1/workers/jobs/{}/progress", ids[0]);
    let (status, answer) = post(
        &s,
        &key,
        &path,
        json!({"worker_id": "w1", "attempt": 1, "percent": 40, "message": "halfway-ish"}),
    )
    .await;
    assert_eq!(status, 204, "{answer}");
    let (_, job) = send(s.req(Method::GET, &format!("/v1/jobs/{}", ids[0]), Some(&read))).await;
    assert_eq!(job["progress"]["percent"], 40.0, "{job}");
    assert_eq!(job["progress"]["message"], "halfway-ish", "{job}");
    assert_eq!(job["progress"]["attempt"], 1, "{job}");
    let (status, answer) = post(
        &s,
        &key,
        &path,
        json!({"worker_id": "w2", "attempt": 1, "percent": 90}),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("progress was not recorded"),
        "{answer}"
    );
    let (status, answer) = post(
        &s,
        &key,
        &path,
        json!({"worker_id": "w1", "attempt": 1, "percent": 101}),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["errors"][0]["field"], "percent", "{answer}");
    let (status, _) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{}/progress", JobId::new()),
        json!({"worker_id": "w1", "attempt": 1, "percent": 1}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        store
            .get(ids[0])
            .await
            .unwrap()
            .unwrap()
            .progress
            .unwrap()
            .percent,
        40.0,
        "refused reports changed nothing"
    );

    // A result with the single-job route, and with the batch.
    let (status, answer) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{}/complete", ids[0]),
        json!({"worker_id": "w1", "attempt": 1, "result": {"sent": 3, "ids": ["a", "b"]}}),
    )
    .await;
    assert_eq!(
        (status, answer["state"].as_str()),
        (200, Some("completed")),
        "{answer}"
    );
    let (_, job) = send(s.req(Method::GET, &format!("/v1/jobs/{}", ids[0]), Some(&read))).await;
    assert_eq!(
        job["result"],
        json!({"sent": 3, "ids": ["a", "b"]}),
        "{job}"
    );
    // A late progress report for a finished attempt is refused.
    let (status, _) = post(
        &s,
        &key,
        &path,
        json!({"worker_id": "w1", "attempt": 1, "percent": 100}),
    )
    .await;
    assert_eq!(status, 409);

    // The batch: one result within the limit, one over it (the attempt fails, saying why).
    let big = "x".repeat(70 * 1024);
    let (status, answer) = post(
        &s,
        &key,
        "/v1/workers/finish",
        json!({"worker_id": "w1", "items": [
            {"id": ids[1], "attempt": 1, "outcome": "complete", "result": [1, 2, 3]},
            {"id": ids[2], "attempt": 1, "outcome": "complete", "result": {"blob": big}},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["items"][0]["state"], "completed", "{answer}");
    assert_eq!(answer["items"][1]["state"], "retryable", "{answer}");
    assert_eq!(
        store.get(ids[1]).await.unwrap().unwrap().result,
        Some(json!([1, 2, 3]))
    );
    let over = store.get(ids[2]).await.unwrap().unwrap();
    assert_eq!(
        over.result, None,
        "an oversized result is not kept, nor cut"
    );
    let error = over.attempts[0].error.clone().unwrap_or_default();
    assert!(error.contains("over the limit"), "{error}");

    // `result` belongs to `complete` only.
    let (status, answer) = post(
        &s,
        &key,
        "/v1/workers/finish",
        json!({"worker_id": "w1", "items": [
            {"id": ids[1], "attempt": 1, "outcome": "snooze", "seconds": 1, "result": 1},
        ]}),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["errors"][0]["field"], "items[0].result", "{answer}");
}

async fn a_worker_key_claims_only_from_its_queues(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let (k, key) = key::create_for_queues(
        &store,
        "emails-worker",
        Scope::Worker,
        &["emails".into()],
        Actor::cli(),
    )
    .await
    .unwrap();
    assert_eq!(k.queues, Some(vec!["emails".to_string()]));
    enqueue(&store, "emails", 3).await;
    let other = enqueue(&store, "billing", 3).await;
    let (status, p) = post(
        &s,
        &key,
        "/v1/workers/claim",
        json!({"worker_id": "w", "queues": ["emails", "billing"]}),
    )
    .await;
    assert_eq!(status, 403, "{p}");
    assert_eq!(p["status"], 403);
    assert!(p["detail"].as_str().unwrap().contains("`billing`"), "{p}");
    assert_eq!(
        store.get(other).await.unwrap().unwrap().state,
        JobState::Available
    );
    assert_eq!(
        claim(&s, &key, json!({"worker_id": "w", "queues": ["emails"]}))
            .await
            .len(),
        1
    );
    // An admin key claims from any queue.
    let admin = s.key(Scope::Admin).await;
    assert_eq!(
        claim(&s, &admin, json!({"worker_id": "w", "queues": ["billing"]}))
            .await
            .len(),
        1
    );
    // The emails key can neither report on nor renew the billing job, even naming its
    // holder and attempt.
    let leased = store.get(other).await.unwrap().unwrap();
    let (status, p) = post(
        &s,
        &key,
        &format!("/v1/workers/jobs/{other}/complete"),
        json!({"worker_id": "w", "attempt": 1}),
    )
    .await;
    assert_eq!(status, 403, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("`billing`"), "{p}");
    let (status, answer) = post(
        &s,
        &key,
        "/v1/workers/finish",
        json!({"worker_id": "w", "items": [{"id": other, "attempt": 1, "outcome": "complete"}]}),
    )
    .await;
    assert_eq!(
        (status, answer["items"][0]["status"].as_u64()),
        (200, Some(403)),
        "{answer}"
    );
    let (status, beat) = post(
        &s,
        &key,
        "/v1/workers/heartbeat",
        json!({"worker_id": "w", "job_ids": [other], "lease_seconds": 3600}),
    )
    .await;
    assert_eq!(
        (status, beat["lost"].clone()),
        (200, json!([other])),
        "{beat}"
    );
    assert_eq!(
        store.get(other).await.unwrap().unwrap(),
        leased,
        "nothing changed"
    );
    // The admin key's worker can.
    let (status, _) = post(
        &s,
        &admin,
        &format!("/v1/workers/jobs/{other}/complete"),
        json!({"worker_id": "w", "attempt": 1}),
    )
    .await;
    assert_eq!(status, 200);
    // Queues are for worker keys only.
    let e = key::create_for_queues(&store, "r", Scope::Read, &["emails".into()], Actor::cli())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("queues"), "{e}");
}

async fn a_worker_key_reaches_only_the_worker_routes(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let id = enqueue(&store, "q", 3).await;
    for (method, path) in [
        (Method::GET, "/v1/jobs".to_string()),
        (Method::GET, format!("/v1/jobs/{id}")),
        (Method::GET, "/v1/workers".to_string()),
        (Method::GET, "/v1/queues".to_string()),
        (Method::POST, format!("/v1/jobs/{id}/retry")),
    ] {
        let (status, p) = send(s.req(method.clone(), &path, Some(&key))).await;
        assert_eq!(status, 403, "{method} {path}: {p}");
        assert!(p["detail"].as_str().unwrap().contains("`worker`"), "{p}");
    }
    let (status, _) = post(&s, &key, "/v1/jobs", json!({"kind": "x"})).await;
    assert_eq!(status, 403);
    // Other scopes cannot claim.
    for scope in [Scope::Read, Scope::Operate, Scope::Enqueue] {
        let other = s.key(scope).await;
        let (status, _) = post(
            &s,
            &other,
            "/v1/workers/claim",
            json!({"worker_id": "w", "queues": ["q"]}),
        )
        .await;
        assert_eq!(status, 403, "{scope}");
    }
}

async fn a_waiting_claim_wakes_on_enqueue(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    // Nothing comes: the claim answers empty after its wait.
    let started = Instant::now();
    assert!(
        claim(
            &s,
            &key,
            json!({"worker_id": "w", "queues": ["idle"], "wait_seconds": 1})
        )
        .await
        .is_empty()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );

    // A job enqueued while the claim waits is handed over at once (the store's wake-up, not
    // the once-a-second look).
    let request = s
        .req(Method::POST, "/v1/workers/claim", Some(&key))
        .json(&json!({"worker_id": "w", "queues": ["other", "wake"], "wait_seconds": 20}));
    let started = Instant::now();
    let waiting = tokio::spawn(async move { send(request).await });
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // While it waits, the worker is registered as serving both queues (an enqueue now does
    // not warn that nobody serves them).
    let serving = conveyor_admin::serving::Serving::read(store.as_ref())
        .await
        .unwrap();
    for queue in ["other", "wake"] {
        assert!(
            serving.serves_queue(queue),
            "a waiting claim's worker does not serve `{queue}`: {:?}",
            serving.workers
        );
    }
    let enqueued_at = Instant::now();
    let id = enqueue(&store, "wake", 3).await;
    let (status, answer) = waiting.await.unwrap();
    let answered = enqueued_at.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["jobs"][0]["id"], json!(id), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(1300));
    assert!(
        answered < Duration::from_millis(900),
        "woken after {answered:?}"
    );
}

async fn bad_input_names_the_field(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let key = s.key(Scope::Worker).await;
    let id = enqueue(&store, "q", 3).await;
    let claim_cases = [
        (json!({"worker_id": "", "queues": ["q"]}), "worker_id"),
        (
            json!({"worker_id": "w".repeat(129), "queues": ["q"]}),
            "worker_id",
        ),
        (json!({"worker_id": "w", "queues": []}), "queues"),
        (
            json!({"worker_id": "w", "queues": ["no spaces"]}),
            "queues[0]",
        ),
        (
            json!({"worker_id": "w", "queues": ["q"], "limit": 0}),
            "limit",
        ),
        (
            json!({"worker_id": "w", "queues": ["q"], "limit": 1001}),
            "limit",
        ),
        (
            json!({"worker_id": "w", "queues": ["q"], "limit": -1}),
            "limit",
        ),
        (
            json!({"worker_id": "w", "queues": ["q"], "lease_seconds": 3601}),
            "lease_seconds",
        ),
        (
            json!({"worker_id": "w", "queues": ["q"], "wait_seconds": 31}),
            "wait_seconds",
        ),
        (
            json!({"worker_id": "w", "queues": ["q"], "extra": 1}),
            "extra",
        ),
        (json!({"queues": ["q"]}), "worker_id"),
    ];
    for (body, field) in claim_cases {
        let (status, p) = post(&s, &key, "/v1/workers/claim", body.clone()).await;
        assert_eq!(status, 422, "{body}: {p}");
        let named = p["errors"][0]["field"].as_str().unwrap_or_default();
        assert!(
            named == field || p["detail"].as_str().unwrap().contains(field),
            "{body}: {p}"
        );
    }
    let claimed = claim(&s, &key, json!({"worker_id": "w", "queues": ["q"]})).await;
    assert_eq!(claimed.len(), 1);
    let cases = [
        (
            format!("/v1/workers/jobs/{id}/fail"),
            json!({"worker_id": "w", "attempt": 1, "error": {"message": ""}}),
            "error.message",
        ),
        (
            format!("/v1/workers/jobs/{id}/fail"),
            json!({"worker_id": "w", "attempt": 1}),
            "body",
        ),
        (
            format!("/v1/workers/jobs/{id}/fail"),
            json!({"worker_id": "w", "attempt": 1, "error": {"message": "x"}, "retry_after_seconds": -5}),
            "retry_after_seconds",
        ),
        (
            format!("/v1/workers/jobs/{id}/snooze"),
            json!({"worker_id": "w", "attempt": 1, "seconds": -1}),
            "seconds",
        ),
        (
            format!("/v1/workers/jobs/{id}/complete"),
            json!({"worker_id": "w", "attempt": 0}),
            "attempt",
        ),
        (
            "/v1/workers/finish".to_string(),
            json!({"worker_id": "w", "items": []}),
            "items",
        ),
        (
            "/v1/workers/finish".to_string(),
            json!({"worker_id": "w", "items": [{"id": id, "attempt": 1, "outcome": "fail"}]}),
            "items[0].error",
        ),
        (
            "/v1/workers/finish".to_string(),
            json!({"worker_id": "w", "items": [{"id": id, "attempt": 1, "outcome": "snooze"}]}),
            "items[0].seconds",
        ),
        (
            "/v1/workers/finish".to_string(),
            json!({"worker_id": "w", "items": [{"id": id, "attempt": 1, "outcome": "complete", "seconds": 3}]}),
            "items[0].seconds",
        ),
        (
            "/v1/workers/finish".to_string(),
            json!({"worker_id": "w", "items": [{"id": id, "attempt": 1, "outcome": "complete"}, {"id": id, "attempt": 1, "outcome": "complete"}]}),
            "items[1].id",
        ),
        (
            "/v1/workers/finish".to_string(),
            json!({"worker_id": "w", "items": [{"id": id, "attempt": 1, "outcome": "done"}]}),
            "items[0].outcome",
        ),
        (
            "/v1/workers/heartbeat".to_string(),
            json!({"worker_id": "w", "job_ids": [id], "lease_seconds": 0}),
            "lease_seconds",
        ),
        (
            "/v1/workers/heartbeat".to_string(),
            json!({"worker_id": "w", "job_ids": ["nope"]}),
            "job_ids[0]",
        ),
    ];
    for (path, body, field) in cases {
        let (status, p) = post(&s, &key, &path, body.clone()).await;
        assert_eq!(status, 422, "{path} {body}: {p}");
        assert_eq!(p["errors"][0]["field"], field, "{path} {body}: {p}");
        if field == "body" {
            assert!(
                p["detail"]
                    .as_str()
                    .unwrap()
                    .contains("missing field `error`"),
                "{p}"
            );
        }
    }
    // None of it touched the job.
    assert_eq!(
        store.get(id).await.unwrap().unwrap().state,
        JobState::Running
    );
}
