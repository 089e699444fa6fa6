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
