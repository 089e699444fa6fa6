//! Webhook deliveries in the platform history: real deliveries to a real HTTP receiver
//! (three endpoints: one answering slowly, one failing some requests before it answers, one
//! always failing), summarised by `stats.rollup` into per-endpoint rows that match what was
//! sent and the finished delivery jobs; a second run over the same minutes writes the same
//! rows. SQLite and Postgres (Redis keeps no per-endpoint rows yet).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor_analytics::query::{self, Resolution, StatsQuery};
use conveyor_analytics::rollup::{WebhookRow, webhook_collection};
use conveyor_analytics::{Rollups, StatsConfig};
use conveyor_jobs::webhook::endpoint::NewEndpoint;
use conveyor_jobs::webhook::event::SendEvent;
use conveyor_jobs::webhook::{self, WebhookConfig, Webhooks};
use conveyor_tests::eventually;
use conveyor_tests::receiver::{Answer, Receiver};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::stats::Histogram;
use conveyor_worker::store::meta::MetaQuery;
use conveyor_worker::store::{JobFilter, Page};
use conveyor_worker::{Job, JobState, Registry, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const EVENTS: usize = 12;
const FLAKY_FAILURES: usize = 5;

async fn stored(s: &Arc<dyn Store>, res: Resolution) -> BTreeMap<String, WebhookRow> {
    s.meta_list(
        webhook_collection(res),
        &MetaQuery {
            limit: 1000,
            ..MetaQuery::default()
        },
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.key.clone(), r.decode::<WebhookRow>().unwrap()))
    .collect()
}

async fn delivery_jobs(s: &Arc<dyn Store>) -> Vec<Job> {
    s.list(
        &JobFilter {
            kind: Some(webhook::model::KIND.into()),
            ..JobFilter::default()
        },
        Page {
            before: None,
            limit: 1000,
        },
    )
    .await
    .unwrap()
}

/// Histograms whose every observation lies at most one bucket apart (a value on a bucket's
/// edge may round either way in SQL's floating point).
fn histograms_agree(a: &Histogram, b: &Histogram) -> bool {
    let expand = |h: &Histogram| -> Vec<i32> {
        h.0.iter()
            .flat_map(|(&b, &n)| std::iter::repeat_n(b, n as usize))
            .collect()
    };
    a.count() == b.count()
        && expand(a)
            .iter()
            .zip(expand(b))
            .all(|(x, y)| (x - y).abs() <= 1)
}

async fn deliveries_per_endpoint_match_what_was_sent(store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let config = WebhookConfig {
        allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        endpoint_cache: Duration::ZERO,
        health_flush: Duration::ZERO,
        timeout: Duration::from_secs(5),
        // The failing endpoint's deliveries all run out their attempts, not into a breaker.
        circuit_threshold: 1000,
        ..WebhookConfig::default()
    };
    let hooks = Arc::new(
        Webhooks::new(store.clone(), config.clone())
            .unwrap()
            .with_keyring(conveyor_tests::test_keyring()),
    );
    let mut registry = Registry::new();
    webhook::register(&mut registry, hooks.clone());
    let worker = Worker::new(
        store.clone(),
        registry,
        WorkerConfig {
            queues: vec![QueueConfig {
                name: config.queue.clone(),
                concurrency: 16,
            }],
            poll_interval: Duration::from_millis(20),
            ..WorkerConfig::default()
        },
    )
    .unwrap();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));

    let endpoint = |path: &str, schedule: Vec<u64>| NewEndpoint {
        url: rx.url(path),
        retry_schedule_ms: Some(schedule),
        ..NewEndpoint::default()
    };
    let slow = hooks
        .create_endpoint(endpoint("/slow", vec![0; 4]))
        .await
        .unwrap();
    let flaky = hooks
        .create_endpoint(endpoint("/flaky", vec![0; 10]))
        .await
        .unwrap();
    let down = hooks
        .create_endpoint(endpoint("/down", vec![0, 0]))
        .await
        .unwrap();
    rx.default_answer("/slow", Answer::Slow(Duration::from_millis(40)));
    rx.script("/flaky", vec![Answer::Status(500); FLAKY_FAILURES]);
    rx.default_answer("/down", Answer::Status(503));
    for i in 0..EVENTS {
        hooks
            .send_event(SendEvent {
                event_type: "order.created".into(),
                payload: json!({"order": i}),
                idempotency_key: None,
            })
            .await
            .unwrap();
    }
    eventually(30, "every delivery to finish", || {
        let s = store.clone();
        async move {
            let jobs = delivery_jobs(&s).await;
            (jobs.len() == 3 * EVENTS && jobs.iter().all(|j| j.state.is_terminal())).then_some(())
        }
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    let jobs = delivery_jobs(&store).await;

    let rollups = Rollups::new(store.clone(), StatsConfig::default());
    let now = store.now().await.unwrap();
    let report = rollups.run_at(now).await.unwrap();
    assert_eq!(report.webhooks, 3 * EVENTS as u64, "{report:?}");

    // The minute rows equal the finished delivery jobs, per minute and endpoint.
    let mut expected: BTreeMap<String, WebhookRow> = BTreeMap::new();
    for j in &jobs {
        let fin = j.finalized_at.unwrap();
        let at = Resolution::Minute.floor(fin);
        let endpoint = j.args["endpoint_id"].as_str().unwrap().to_owned();
        let row = expected
            .entry(format!("{}|{endpoint}", Resolution::Minute.key_prefix(at)))
            .or_insert_with(|| WebhookRow {
                at,
                endpoint,
                ..WebhookRow::default()
            });
        match j.state {
            JobState::Completed => row.delivered += 1,
            JobState::Cancelled => row.cancelled += 1,
            _ => row.failed += 1,
        }
        row.attempts += j.attempt as u64;
        row.latency
            .record((fin - j.attempted_at.unwrap()).num_microseconds().unwrap());
    }
    let minutes = stored(&store, Resolution::Minute).await;
    assert_eq!(
        minutes.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, want) in &expected {
        let got = &minutes[key];
        assert_eq!(
            (got.delivered, got.failed, got.cancelled, got.attempts),
            (want.delivered, want.failed, want.cancelled, want.attempts),
            "{key}"
        );
        assert!(histograms_agree(&got.latency, &want.latency), "{key}");
    }

    // Read back: what the receiver saw.
    let q = StatsQuery {
        from: Some(now - chrono::TimeDelta::hours(1)),
        to: Some(now + chrono::TimeDelta::minutes(1)),
        resolution: Some(Resolution::Hour),
        ..StatsQuery::default()
    };
    let read = query::read_webhooks(&store, &StatsConfig::default(), &q, None, now)
        .await
        .unwrap();
    let by: BTreeMap<&str, &query::WebhookSummary> = read
        .endpoints
        .iter()
        .map(|e| (e.endpoint.as_deref().unwrap(), e))
        .collect();
    let n = EVENTS as u64;
    let s = by[slow.id.as_str()];
    assert_eq!((s.delivered, s.failed, s.retries), (n, 0, 0));
    assert_eq!(s.attempts as usize, rx.received("/slow").len());
    let p50 = s.latency.p50_ms.unwrap();
    assert!(p50 >= 40.0 * 0.95, "slow endpoint p50 {p50} ms");
    let f = by[flaky.id.as_str()];
    assert_eq!(
        (f.delivered, f.failed, f.attempts, f.retries),
        (n, 0, n + FLAKY_FAILURES as u64, FLAKY_FAILURES as u64)
    );
    assert_eq!(f.attempts as usize, rx.received("/flaky").len());
    let d = by[down.id.as_str()];
    assert_eq!((d.delivered, d.failed), (0, n));
    assert_eq!(d.attempts as usize, rx.received("/down").len());
    assert_eq!(d.retries, d.attempts - n);
    assert!(d.retries >= n, "each failing delivery was retried");
    assert_eq!(d.failure_rate, Some(1.0));
    assert_eq!(read.total.delivered, 2 * n);
    assert_eq!(read.total.failed, n);
    assert_eq!(read.points.iter().map(|p| p.delivered).sum::<u64>(), 2 * n);
    // One endpoint only.
    let one = query::read_webhooks(
        &store,
        &StatsConfig::default(),
        &q,
        Some(flaky.id.as_str()),
        now,
    )
    .await
    .unwrap();
    assert_eq!(one.endpoints.len(), 1);
    assert_eq!(one.total.delivered, n);

    // Hours merged from the minutes.
    let hours = stored(&store, Resolution::Hour).await;
    let delivered: u64 = hours.values().map(|r| r.delivered).sum();
    assert_eq!(delivered, 2 * n);

    // The same minutes again: the same rows.
    let again = rollups.run_at(now).await.unwrap();
    assert_eq!(again.webhooks, report.webhooks);
    assert_eq!(stored(&store, Resolution::Minute).await, minutes);
    assert_eq!(stored(&store, Resolution::Hour).await, hours);
}

conveyor_tests::store_variant_tests!(
    sqlite,
    async { Some(conveyor_tests::TestStore::sqlite().await) },
    deliveries_per_endpoint_match_what_was_sent
);
conveyor_tests::store_variant_tests!(
    postgres,
    conveyor_tests::TestStore::postgres(),
    deliveries_per_endpoint_match_what_was_sent
);
