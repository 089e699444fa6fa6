//! `conveyor serve` keeps the platform history: its `conveyor.stats` schedule is stored with
//! the scheduler role, a tick (triggered here rather than waited for) runs `stats.rollup` on
//! the worker role, and `GET /v1/stats/jobs` and `conveyor stats` read the same totals back
//! — also after the finished jobs are purged. Bad periods are refused naming the flag.

mod common;

use std::sync::Arc;

use common::{run, run_json, serve};
use conveyor_tests::eventually;
use conveyor_worker::store::JobFilter;
use conveyor_worker::{JobState, NewJob, Store};
use serde_json::json;

async fn count(store: &Arc<dyn Store>, kind: &str, states: &[JobState]) -> u64 {
    store
        .count(&JobFilter {
            kind: Some(kind.into()),
            states: states.to_vec(),
            ..JobFilter::default()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_the_history_and_both_readers_agree() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let url = t.url.clone();
    let store = t.store.clone();
    let key = run_json(
        &url,
        &["keys", "create", "--scope", "read", "--name", "stats"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut server, addr) = serve(&url);

    let mut jobs: Vec<NewJob> = (0..30)
        .map(|i| NewJob::new("demo.echo", json!({"msg": format!("m{i}")})))
        .collect();
    jobs.extend(
        (0..4).map(|_| NewJob::new("demo.fail", json!({"message": "no", "permanent": true}))),
    );
    store.enqueue_many(jobs).await.unwrap();
    eventually(30, "the demo jobs to finish", || {
        let store = store.clone();
        async move {
            let done = count(&store, "demo.echo", &[JobState::Completed]).await
                + count(&store, "demo.fail", &[JobState::Dead]).await;
            (done == 34).then_some(())
        }
    })
    .await;

    // The schedule is there; one tick now instead of at the next minute.
    let schedule = run_json(&url, &["schedules", "show", "conveyor.stats"]);
    assert_eq!(schedule["spec"]["kind"], "stats.rollup", "{schedule}");
    let (code, _, err) = run(&url, &["schedules", "trigger", "conveyor.stats"]);
    assert_eq!(code, 0, "{err}");
    eventually(30, "the rollup job to complete", || {
        let store = store.clone();
        async move {
            (count(&store, "stats.rollup", &[JobState::Completed]).await >= 1).then_some(())
        }
    })
    .await;

    let http = reqwest::Client::new();
    let api: serde_json::Value = http
        .get(format!("http://{addr}/v1/stats/jobs?period=1h"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["resolution"], "minute", "{api}");
    let total = &api["total"];
    // The rollup job itself may be counted by a later tick, not by the one that ran it.
    assert!(total["completed"].as_u64().unwrap() >= 30, "{api}");
    assert_eq!(total["dead"], 4, "{api}");
    let echo = api["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["kind"] == "demo.echo")
        .unwrap_or_else(|| panic!("demo.echo in {api}"));
    assert_eq!(echo["completed"], 30);
    assert!(echo["run"]["p50_ms"].as_f64().is_some(), "{echo}");

    let cli = run_json(&url, &["stats", "--period", "1h", "--kind", "demo.fail"]);
    assert_eq!(cli["total"]["dead"], 4, "{cli}");
    assert_eq!(cli["total"]["failure_rate"], 1.0, "{cli}");
    let (code, human, err) = run(&url, &["stats", "--period", "1h"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        human.contains("finished │") && human.contains("demo.echo"),
        "{human}"
    );

    // The raw jobs go; the history stays.
    let (code, _, err) = run(&url, &["dead", "purge", "--all"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&store, "demo.fail", &[JobState::Dead]).await, 0);
    let after = run_json(&url, &["stats", "--period", "1h", "--kind", "demo.fail"]);
    assert_eq!(after["total"]["dead"], 4, "{after}");

    // Bad input: named, exit 2 / 422.
    let (code, _, err) = run(&url, &["stats", "--period", "banana"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("period") && err.contains("banana"), "{err}");
    let r = http
        .get(format!(
            "http://{addr}/v1/stats/jobs?period=1h&from=2026-01-01T00:00:00Z"
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body = r.text().await.unwrap();
    assert!(body.contains("period"), "{body}");

    server.stop(nix::sys::signal::Signal::SIGTERM, 30);
    drop(t);
}

/// `conveyor stats --webhooks`: per-endpoint rows written by `stats.rollup` from finished
/// `webhook.deliver` jobs (run here by a worker with a stand-in handler: the rollup reads only
/// the jobs), as a table and as JSON; `--endpoint` keeps one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_webhooks_shows_deliveries_per_endpoint() {
    use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
    use conveyor_worker::{JobContext, JobError, Outcome, Registry};
    use std::time::Duration;

    let t = conveyor_tests::TestStore::sqlite().await;
    let url = t.url.clone();
    let store = t.store.clone();
    let mut registry = Registry::new();
    registry.register(
        "webhook.deliver",
        |args: serde_json::Value, ctx: JobContext| async move {
            match (args["endpoint_id"].as_str(), ctx.job.attempt) {
                (Some("ep_down"), _) => Ok(Outcome::Fail(JobError::new("HTTP 410"))),
                (Some("ep_flaky"), 1) => Ok(Outcome::retry_after(Duration::ZERO, "HTTP 500")),
                _ => Ok(Outcome::Done),
            }
        },
    );
    let mut jobs = Vec::new();
    for (endpoint, n) in [("ep_ok", 5), ("ep_flaky", 3), ("ep_down", 2)] {
        for i in 0..n {
            jobs.push(
                NewJob::new(
                    "webhook.deliver",
                    json!({"event_id": format!("evt_{endpoint}_{i}"), "endpoint_id": endpoint}),
                )
                .queue("webhooks"),
            );
        }
    }
    jobs.push(
        NewJob::new(
            "webhook.deliver",
            json!({"event_id": "evt_direct", "url": "http://x"}),
        )
        .queue("webhooks"),
    );
    store.enqueue_many(jobs).await.unwrap();
    let worker = Worker::new(
        store.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: "webhooks".into(),
                concurrency: 4,
            }],
            poll_interval: Duration::from_millis(20),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    eventually(30, "every delivery to finish", || {
        let s = store.clone();
        async move {
            (count(
                &s,
                "webhook.deliver",
                &[JobState::Completed, JobState::Dead],
            )
            .await
                == 11)
                .then_some(())
        }
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    conveyor_analytics::Rollups::new(store.clone(), conveyor_analytics::StatsConfig::default())
        .run_once()
        .await
        .unwrap();

    let all = run_json(&url, &["stats", "--webhooks", "--period", "1h"]);
    assert_eq!(all["total"]["delivered"], 9, "{all}");
    assert_eq!(all["total"]["failed"], 2, "{all}");
    assert_eq!(all["total"]["retries"], 3, "{all}");
    let endpoints: Vec<&str> = all["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(
        endpoints,
        ["ep_ok", "ep_flaky", "ep_down", "direct"],
        "most first"
    );
    let flaky = run_json(
        &url,
        &[
            "stats",
            "--webhooks",
            "--endpoint",
            "ep_flaky",
            "--period",
            "1h",
        ],
    );
    assert_eq!(flaky["total"]["delivered"], 3);
    assert_eq!(flaky["total"]["attempts"], 6);
    let (code, out, err) = run(&url, &["stats", "--webhooks", "--period", "1h"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("webhook deliveries"), "{out}");
    assert!(out.contains("delivered 9  failed 2"), "{out}");
    assert!(out.contains("ep_flaky"), "{out}");
    let (code, _, err) = run(&url, &["stats", "--webhooks", "--queue", "mail"]);
    assert_ne!(code, 0);
    assert!(err.contains("--queue"), "{err}");
    t.cleanup().await;
}
