//! Redis only: the key layout that lets the backend run on Redis Cluster, and idempotency keys
//! that never expire while their job exists.

use std::time::Duration;

use chrono::Utc;
use conveyor_tests::TestStore;
use conveyor_worker::store::{FetchRequest, Finish, JobFilter, RetentionPolicy};
use conveyor_worker::{AttemptOutcome, AttemptRecord, JobState, NewJob, RetryPolicy};
use serde_json::json;

/// Every key under `prefix`, with its remaining time to live in ms (-1: none).
async fn keys_of(prefix: &str) -> Vec<(String, i64)> {
    let client = redis::Client::open(conveyor_tests::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut out = Vec::new();
    for k in conveyor_tests::keys_with_prefix(&mut conn, prefix)
        .await
        .unwrap()
    {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((k, ttl));
    }
    out
}

fn prefix_of(url: &str) -> String {
    url.split("prefix=").nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_keys_share_their_queues_hash_tag() {
    let Some(t) = TestStore::redis().await else {
        return;
    };
    let s = t.store.clone();
    let mut held = Vec::new();
    for queue in ["default", "mail", "billing.v2"] {
        s.enqueue_many(vec![
            NewJob::new("k", json!({})).queue(queue),
            NewJob::new("k", json!({}))
                .queue(queue)
                .run_at(Utc::now() + chrono::Duration::hours(1)),
            NewJob::new("k", json!({}))
                .queue(queue)
                .idempotency_key(format!("{queue}-once")),
        ])
        .await
        .unwrap();
        let got = s
            .fetch(FetchRequest {
                queue,
                limit: 2,
                worker: "w1",
                lease: Duration::from_millis(1),
            })
            .await
            .unwrap();
        held.extend(got.iter().map(|j| j.id));
        let now = Utc::now();
        s.finish(vec![Finish {
            id: got[0].id,
            attempt: 1,
            state: JobState::Dead,
            run_at: None,
            attempt_delta: 0,
            record: AttemptRecord {
                attempt: 1,
                started_at: now,
                finished_at: now,
                worker: Some("w1".into()),
                outcome: AttemptOutcome::Failed,
                error: Some("no".into()),
                causes: vec![],
                duration_ms: 0,
                traceback: None,
            },
            result: None,
        }])
        .await
        .unwrap();
    }
    s.heartbeat("w1", &held, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.rescue_expired(Utc::now(), &RetryPolicy::default(), 100)
        .await
        .unwrap();

    let prefix = prefix_of(&t.url);
    let keys = keys_of(&prefix).await;
    assert!(keys.len() > 10, "{keys:?}");
    let global = [
        format!("{prefix}:index"),
        format!("{prefix}:queues"),
        format!("{prefix}:version"),
    ];
    for (key, ttl) in &keys {
        if let Some(rest) = key.strip_prefix('{') {
            // One slot per queue: the tag is `{prefix:queue}`, whatever follows.
            let (tag, _) = rest.split_once('}').expect("a closed hash tag");
            let queue = tag
                .strip_prefix(&format!("{prefix}:"))
                .expect("tag starts with the prefix");
            assert!(["default", "mail", "billing.v2"].contains(&queue), "{key}");
        } else if let Some(k) = key.strip_prefix(&format!("{prefix}:key:")) {
            assert!(k.ends_with("-once"), "{key}");
            assert_eq!(
                *ttl, -1,
                "a confirmed key does not expire while its job lives"
            );
        } else {
            assert!(global.contains(key), "unexpected global key {key}");
        }
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_jobs_leaves_no_keys_behind() {
    let Some(t) = TestStore::redis().await else {
        return;
    };
    let s = t.store.clone();
    let ids = s
        .enqueue_many(
            (0..30)
                .map(|i| NewJob::new("k", json!({})).idempotency_key(format!("k{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let got = s
        .fetch(FetchRequest {
            queue: "default",
            limit: 30,
            worker: "w1",
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap();
    let now = Utc::now();
    s.finish(
        got.iter()
            .map(|j| Finish {
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
                    causes: vec![],
                    duration_ms: 0,
                    traceback: None,
                },
                result: None,
            })
            .collect(),
    )
    .await
    .unwrap();
    s.discard(ids[0].id).await.unwrap();
    assert_eq!(
        s.prune(
            Utc::now() + chrono::Duration::days(3),
            &RetentionPolicy::default(),
            20
        )
        .await
        .unwrap(),
        20
    );
    assert_eq!(s.purge(&JobFilter::default()).await.unwrap(), 9);
    let prefix = prefix_of(&t.url);
    let left: Vec<String> = keys_of(&prefix)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !k.ends_with(":version") && !k.ends_with(":queues"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    t.cleanup().await;
}

fn record(attempt: i32, outcome: AttemptOutcome, error: Option<&str>) -> AttemptRecord {
    let now = Utc::now();
    AttemptRecord {
        attempt,
        started_at: now,
        finished_at: now,
        worker: Some("w1".into()),
        outcome,
        error: error.map(Into::into),
        causes: vec![],
        duration_ms: 0,
        traceback: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_1_store_is_migrated_in_place() {
    let Some(t) = TestStore::redis().await else {
        return;
    };
    let s = t.store.clone();
    let prefix = prefix_of(&t.url);
    s.enqueue_many(vec![
        NewJob::new("k", json!({ "n": 1 })),
        NewJob::new("k", json!({ "n": 2 })),
    ])
    .await
    .unwrap();
    let running = s
        .fetch(FetchRequest {
            queue: "default",
            limit: 2,
            worker: "w1",
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap();
    assert_eq!(running.len(), 2);

    // Make it look as layout 1 left it: a per-state set of running jobs, and an attempt
    // history kept as a JSON array inside the job's hash.
    let client = redis::Client::open(conveyor_tests::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let base = format!("{{{prefix}:default}}");
    let old = record(0, AttemptOutcome::Failed, Some("from layout 1"));
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg(format!("{prefix}:version")).arg(1);
    for j in &running {
        pipe.cmd("ZADD")
            .arg(format!("{base}:s:running"))
            .arg(0)
            .arg(j.id.to_string());
    }
    pipe.cmd("HSET")
        .arg(format!("{base}:job:{}", running[0].id))
        .arg("attempts")
        .arg(serde_json::to_string(&vec![old.clone()]).unwrap());
    pipe.query_async::<()>(&mut conn).await.unwrap();

    let refused = s.ping().await.unwrap_err().to_string();
    assert!(
        refused.contains("layout 1") && refused.contains("conveyor migrate"),
        "{refused}"
    );
    s.migrate().await.unwrap();
    s.ping().await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("{base}:s:running"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "the old set of running jobs is gone");
    let filter = JobFilter {
        states: vec![JobState::Running],
        ..JobFilter::default()
    };
    assert_eq!(s.count(&filter).await.unwrap(), 2);
    assert_eq!(
        s.list(&filter, Default::default()).await.unwrap().len(),
        2,
        "running jobs are listed from the lease set"
    );

    // A history kept in the hash is read, and new attempts follow it.
    let j = &running[0];
    let now_done = record(j.attempt, AttemptOutcome::Completed, None);
    s.finish(vec![Finish {
        id: j.id,
        attempt: j.attempt,
        state: JobState::Completed,
        run_at: None,
        attempt_delta: 0,
        record: now_done.clone(),
        result: None,
    }])
    .await
    .unwrap();
    let got = s.get(j.id).await.unwrap().unwrap();
    assert_eq!(got.attempts, vec![old, now_done]);
    assert_eq!(s.count(&filter).await.unwrap(), 1);
    t.cleanup().await;
}
