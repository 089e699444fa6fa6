//! Two real `conveyor serve` processes on one Postgres database: the second streams
//! (`GET /v1/jobs/events`) and long-polls (`?wait=`) the changes that the first process's
//! enqueue and a third client's completion made, which reach it only through Postgres (the
//! third client's claim does not: claims are announced in the claiming process only); and `conveyor jobs show` prints the job's result and progress.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Process, conveyor, run, run_json, serve};
use conveyor_worker::store::{FetchRequest, Finish};
use conveyor_worker::{AttemptOutcome, AttemptRecord, JobId, JobState, Progress, Store};
use serde_json::json;

/// Reads the event stream until `done` holds for the `job` events' data seen so far.
async fn read_events(
    response: &mut reqwest::Response,
    mut done: impl FnMut(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter(|block| block.lines().any(|l| l == "event: job"))
            .filter_map(|block| {
                let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
                serde_json::from_str(data).ok()
            })
            .collect();
        if done(&events) {
            return events;
        }
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("the stream ended or stalled ({other:?}); read so far:\n{text}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_process_sees_changes_made_elsewhere() {
    let Some(t) = conveyor_tests::TestStore::postgres().await else {
        return;
    };
    let url = t.url.clone();
    let store: Arc<dyn Store> = t.store.clone();
    let admin = run_json(
        &url,
        &["keys", "create", "--scope", "admin", "--name", "results"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let (_first, first_addr) = serve(&url);
    let (_second, second_addr) = serve(&url);
    let http = reqwest::Client::new();

    // Follow the queue on the second process.
    let mut stream = http
        .get(format!(
            "http://{second_addr}/v1/jobs/events?queue=elsewhere"
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );

    // Enqueue through the first process, on a queue no serve process runs.
    let created: serde_json::Value = http
        .post(format!("http://{first_addr}/v1/jobs"))
        .bearer_auth(&admin)
        .json(&json!({"kind": "remote.sum", "queue": "elsewhere", "args": {"n": [1, 2]}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id: JobId = created["job"]["id"].as_str().unwrap().parse().unwrap();

    // Long-poll it on the second process while this test claims and completes it.
    let waiter = {
        let http = http.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let job: serde_json::Value = http
                .get(format!("http://{second_addr}/v1/jobs/{id}?wait=30s"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (job, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = store
        .fetch(FetchRequest {
            queue: "elsewhere",
            limit: 1,
            worker: "test-worker",
            lease: Duration::from_secs(30),
        })
        .await
        .unwrap()
        .pop()
        .expect("the job is claimable");
    store
        .report_progress(
            id,
            &Progress {
                attempt: running.attempt,
                percent: 80.0,
                message: Some("adding up".into()),
                updated_at: Utc::now(),
            },
        )
        .await
        .unwrap();
    let now = Utc::now();
    store
        .finish(vec![Finish {
            id,
            attempt: running.attempt,
            state: JobState::Completed,
            run_at: None,
            attempt_delta: 0,
            record: AttemptRecord {
                attempt: running.attempt,
                started_at: now,
                finished_at: now,
                worker: Some("test-worker".into()),
                outcome: AttemptOutcome::Completed,
                error: None,
                causes: Vec::new(),
                duration_ms: 1,
                traceback: None,
            },
            result: Some(json!({"total": 3})),
        }])
        .await
        .unwrap();

    let (job, took) = waiter.await.unwrap();
    assert_eq!(job["state"], "completed");
    assert_eq!(job["result"], json!({"total": 3}));
    assert!(took < Duration::from_secs(20), "{took:?}");

    let id_text = id.to_string();
    let events = read_events(&mut stream, |events| {
        events
            .iter()
            .any(|e| e["id"] == id_text.as_str() && e["state"] == "completed")
    })
    .await;
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e["id"] == id_text.as_str())
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    // A claim by another process is not announced across processes (decision 0006).
    assert_eq!(states, ["available", "completed"]);
    assert!(events.iter().all(|e| e["queue"] == "elsewhere"));

    // The CLI shows the result and the last progress.
    let (code, out, err) = run(&url, &["jobs", "show", &id_text]);
    assert_eq!(code, 0, "{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` line in:\n{out}"))
            .to_string()
    };
    assert!(line("result").contains(r#"{"total":3}"#), "{out}");
    assert!(
        line("progress").contains("80% adding up (attempt 1"),
        "{out}"
    );
    drop(stream);
    t.cleanup().await;
}

/// `worker.max_result_bytes` bounds what a remote worker reports too: over it, the attempt
/// fails with the limit named (and the job retries); within it, the result is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_workers_result_is_held_to_the_configured_limit() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let url = t.url.clone();
    let mut cmd = conveyor(&url, &["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("CONVEYOR_WORKER__MAX_RESULT_BYTES", "64");
    let mut p = Process::spawn(cmd);
    let line = p.wait_for_line("listening on http://", 30);
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("an address in: {line}"));
    let (code, key, err) = run(
        &url,
        &["keys", "create", "--scope", "worker", "--name", "w"],
    );
    assert_eq!(code, 0, "{err}");
    let key = key.trim().to_string();
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let job = run_json(&url, &["enqueue", "--queue", "remote", "--kind", "r.sum"]);
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let claimed: serde_json::Value = http
        .post(format!("http://{addr}/v1/workers/claim"))
        .bearer_auth(&key)
        .json(&json!({"worker_id": "w1", "queues": ["remote"], "limit": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(claimed["jobs"].as_array().unwrap().len(), 2, "{claimed}");
    let complete = |id: &str, result: serde_json::Value| {
        http.post(format!("http://{addr}/v1/workers/jobs/{id}/complete"))
            .bearer_auth(&key)
            .json(&json!({"worker_id": "w1", "attempt": 1, "result": result}))
            .send()
    };
    let big = complete(&ids[0], json!({"text": "x".repeat(100)}))
        .await
        .unwrap();
    assert!(big.status().is_success(), "{:?}", big.text().await);
    let small = complete(&ids[1], json!({"sum": 3})).await.unwrap();
    assert!(small.status().is_success(), "{:?}", small.text().await);

    let big = run_json(&url, &["jobs", "show", &ids[0]]);
    assert_eq!(big["state"], "retryable", "{big}");
    let error = big["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("worker.max_result_bytes"), "{big}");
    let small = run_json(&url, &["jobs", "show", &ids[1]]);
    assert_eq!(small["state"], "completed", "{small}");
    assert_eq!(small["result"], json!({"sum": 3}), "{small}");
    drop(p);
}
