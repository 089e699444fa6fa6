//! `conveyor bench --workload webhooks`: signed deliveries to a receiver in this process.
//!
//! 1. Throughput: bulk-enqueue N deliveries to one endpoint (no worker running), start a
//!    worker with the webhook kind registered, and time from the receiver's first request
//!    until the store counts all N jobs completed → deliveries/s.
//! 2. Latency: with the worker warm, send M events one at a time every G ms through
//!    `Webhooks::send_event` (fan-out, event record); each latency is the receiver's arrival
//!    − the instant just before the send → p50/p99.
//!
//! Every delivery is signed, goes through the SSRF guard (loopback allow-listed), the circuit
//! check and the HTTP client, and writes its attempt-log record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::Utc;
use conveyor_jobs::webhook::endpoint::NewEndpoint;
use conveyor_jobs::webhook::event::SendEvent;
use conveyor_jobs::webhook::{self, DeliverArgs, WebhookConfig, Webhooks};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::{Registry, Store};
use tokio_util::sync::CancellationToken;

use super::{
    BenchArgs, lock, peak_rss_mb, percentile, progress, round, short_backend, wait_completed,
};

#[derive(Default)]
struct Seen {
    first: Option<Instant>,
    count: u64,
    by_id: HashMap<String, Instant>,
}

async fn receive(State(seen): State<Arc<Mutex<Seen>>>, headers: HeaderMap) -> &'static str {
    let now = Instant::now();
    let mut s = lock(&seen);
    s.first.get_or_insert(now);
    s.count += 1;
    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok())
        && !id.starts_with("evt_bulk_")
    {
        s.by_id.entry(id.to_string()).or_insert(now);
    }
    "ok"
}

/// Runs the webhook protocol on `store`.
pub async fn run(args: &BenchArgs, store: Arc<dyn Store>) -> anyhow::Result<()> {
    let backend = store.backend_name().await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(seen.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let suffix = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let config = WebhookConfig {
        queue: format!("bench_wh_{suffix}"),
        allow_cidrs: vec!["127.0.0.0/8".parse().expect("a CIDR")],
        // For A/B runs: CONVEYOR_BENCH_ATTEMPT_LOG=false measures without the attempt log.
        attempt_log: std::env::var("CONVEYOR_BENCH_ATTEMPT_LOG").map_or(true, |v| v != "false"),
        ..WebhookConfig::default()
    };
    // The benchmark's endpoint is its own: a key for this run seals its secret.
    let keys = conveyor_worker::keyring::Keyring::new([conveyor_worker::keyring::Key::generate()]);
    let hooks = Arc::new(Webhooks::new(store.clone(), config.clone())?.with_keyring(keys));
    let ep = hooks
        .create_endpoint(NewEndpoint {
            url: format!("http://{addr}/hook"),
            event_types: vec![format!("bench.{suffix}")],
            ..NewEndpoint::default()
        })
        .await?;
    let say = |msg: String| {
        if !args.json {
            errln!("{msg}");
        }
    };
    say(format!(
        "conveyor bench webhooks on {backend}: {} deliveries, {} latency events every {} ms, concurrency {}",
        args.jobs, args.latency_jobs, args.latency_gap_ms, args.concurrency
    ));

    // Phase 1: enqueue N deliveries (not timed), then deliver them.
    let now = Utc::now();
    let mut enqueued = 0u64;
    while enqueued < args.jobs {
        let n = (args.jobs - enqueued).min(args.enqueue_batch as u64);
        let mut batch = Vec::with_capacity(n as usize);
        for i in enqueued..enqueued + n {
            let deliver = DeliverArgs {
                event_id: format!("evt_bulk_{suffix}_{i}"),
                event_type: format!("bench.{suffix}"),
                created_at: now,
                payload: serde_json::json!({"seq": i, "note": "a typical small webhook payload"}),
                endpoint_id: Some(ep.id.clone()),
                url: None,
            };
            batch.push(hooks.delivery_job(&deliver, None)?);
        }
        store.enqueue_many(batch).await?;
        enqueued += n;
        progress(args.json, "enqueue", enqueued, args.jobs);
    }
    say(String::new());

    let mut registry = Registry::new();
    webhook::register(&mut registry, hooks.clone());
    let fetch_batch = args.concurrency.min(200);
    let worker_config = WorkerConfig {
        queues: vec![QueueConfig {
            name: config.queue.clone(),
            concurrency: args.concurrency,
        }],
        fetch_batch,
        ..WorkerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let worker = Worker::new(store.clone(), registry, worker_config)?;
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    let done_at = wait_completed(&store, &config.queue, args.jobs, args.json, None).await?;
    let first = lock(&seen).first.context("the receiver got nothing")?;
    let secs = done_at.duration_since(first).as_secs_f64();
    let deliveries_s = args.jobs as f64 / secs;
    say(format!(
        "\ndeliver: {} deliveries in {secs:.3} s = {deliveries_s:.0} deliveries/s",
        args.jobs
    ));
    let received = lock(&seen).count;
    if received < args.jobs {
        bail!("the receiver got {received} of {} deliveries", args.jobs);
    }

    // Phase 2: latency, one event at a time.
    let gap = Duration::from_millis(args.latency_gap_ms);
    let mut next = tokio::time::Instant::now();
    let mut sent_at: Vec<(String, Instant)> = Vec::with_capacity(args.latency_jobs as usize);
    for seq in 0..args.latency_jobs {
        tokio::time::sleep_until(next).await;
        next += gap;
        let before = Instant::now();
        let sent = hooks
            .send_event(SendEvent {
                event_type: format!("bench.{suffix}"),
                payload: serde_json::json!({"seq": seq}),
                idempotency_key: Some(format!("lat-{suffix}-{seq}")),
            })
            .await?;
        sent_at.push((sent.event.id, before));
    }
    let all = args.jobs + args.latency_jobs;
    wait_completed(&store, &config.queue, all, true, None).await?;
    shutdown.cancel();
    worker.await??;
    server.abort();
    let lat_arrivals = std::mem::take(&mut lock(&seen).by_id);
    let mut lat: Vec<f64> = sent_at
        .iter()
        .filter_map(|(id, before)| {
            let at = lat_arrivals.get(id)?;
            Some(at.duration_since(*before).as_secs_f64() * 1e3)
        })
        .collect();
    if lat.len() != args.latency_jobs as usize {
        bail!(
            "only {} of {} latency events arrived",
            lat.len(),
            args.latency_jobs
        );
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    say(format!(
        "latency: p50 {p50:.2} ms, p99 {p99:.2} ms over {} events",
        lat.len()
    ));
    let result = serde_json::json!({
        "system": "conveyor",
        "workload": "webhooks",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": short_backend(&backend),
        "deliveries_s": round(deliveries_s, 1),
        "lat_p50_ms": round(p50, 3),
        "lat_p99_ms": round(p99, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "config": format!(
            "1 worker process + receiver in-process, concurrency {}, fetch batch {fetch_batch}, attempt log {}, signed, SSRF guard on (loopback allow-listed)",
            args.concurrency,
            if config.attempt_log { "on" } else { "off" }
        ),
    });
    if args.json {
        outln!("{result}");
    } else {
        outln!(
            "{backend}: {deliveries_s:.0} deliveries/s, latency p50 {p50:.2} ms / p99 {p99:.2} ms, peak RSS {:.1} MB",
            peak_rss_mb()
        );
    }
    Ok(())
}
