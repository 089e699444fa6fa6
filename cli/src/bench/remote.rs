//! `conveyor bench --workload remote`: remote workers pulling jobs over HTTP.
//!
//! The API `conveyor serve` runs is started in this process on `127.0.0.1:0` (rate limit off,
//! as a deployment sized for its workers would set it), with a `worker` key. Then:
//!
//! 1. Enqueue: with no worker running, bulk-enqueue N no-op jobs → `enqueue_jobs_s`.
//! 2. Process: `--remote-workers` HTTP loops, each claiming `--remote-batch` jobs at a time
//!    (`POST /v1/workers/claim`, long-polling) and reporting them in one
//!    `POST /v1/workers/finish`; from the first claim until the store counts all N jobs
//!    `completed` → `process_jobs_s`.
//! 3. Latency: with the loops waiting in their long-poll, enqueue M jobs one at a time every
//!    G ms; each latency is the claim's answer − the instant just before the enqueue.
//!
//! Every request goes through the real router (key check, body checks, the remote-worker
//! rules) over real HTTP/1.1 connections from reqwest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use conveyor_api::audit::Actor;
use conveyor_api::key::{self, Scope};
use conveyor_api::{ApiConfig, AppState};
use conveyor_worker::{NewJob, Store};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    BenchArgs, BenchResult, lock, peak_rss_mb, percentile, progress, round, short_backend,
    wait_completed,
};

/// What the loops share.
struct Shared {
    base: String,
    token: String,
    queue: String,
    batch: u32,
    http: reqwest::Client,
    origin: Instant,
    /// Nanoseconds after `origin` of the first claim sent; `u64::MAX` until then.
    first: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    /// Latency jobs: seq → when a claim handed it over.
    claimed: Mutex<HashMap<u64, Instant>>,
}

/// Runs the remote-worker protocol on `store`.
pub async fn run(args: &BenchArgs, store: Arc<dyn Store>) -> anyhow::Result<()> {
    if args.remote_workers == 0 || !(1..=1000).contains(&args.remote_batch) {
        bail!("--remote-workers must be at least 1 and --remote-batch 1 to 1000");
    }
    let backend = store.backend_name().await?;
    let queue = format!("bench_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let say = |msg: String| {
        if !args.json {
            errln!("{msg}");
        }
    };
    say(format!(
        "conveyor bench --workload remote on {backend}: {} jobs, {} HTTP workers claiming {} at a time, {} latency jobs every {} ms",
        args.jobs, args.remote_workers, args.remote_batch, args.latency_jobs, args.latency_gap_ms
    ));

    // The API, as `conveyor serve` runs it.
    let mut config = ApiConfig::default();
    config.rate_limit.enabled = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop_api = CancellationToken::new();
    let app = conveyor_api::router(AppState::new(store.clone(), config));
    let s = stop_api.clone();
    let api = tokio::spawn(async move {
        conveyor_api::serve(listener, app, async move { s.cancelled().await }).await
    });
    let (_, token) = key::create(&store, "bench-remote", Scope::Worker, Actor::cli()).await?;

    // Phase 1: bulk enqueue, no worker running.
    let started = Instant::now();
    let mut enqueued = 0u64;
    while enqueued < args.jobs {
        let n = (args.jobs - enqueued).min(args.enqueue_batch as u64);
        let batch: Vec<NewJob> = (enqueued..enqueued + n)
            .map(|i| {
                NewJob::new("bench.noop", json!({}))
                    .queue(queue.clone())
                    .idempotency_key(format!("{queue}-{i}"))
            })
            .collect();
        let res = store.enqueue_many(batch).await?;
        if res.iter().any(|r| r.duplicate) {
            bail!("the bench queue already held jobs; use an empty store");
        }
        enqueued += n;
        progress(args.json, "enqueue", enqueued, args.jobs);
    }
    let enqueue_secs = started.elapsed().as_secs_f64();
    let enqueue_jobs_s = args.jobs as f64 / enqueue_secs;
    say(format!(
        "\nenqueue: {} jobs in {:.3} s = {:.0} jobs/s",
        args.jobs, enqueue_secs, enqueue_jobs_s
    ));

    // Phase 2: the HTTP workers.
    let shared = Arc::new(Shared {
        base: format!("http://{addr}"),
        token,
        queue: queue.clone(),
        batch: args.remote_batch,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(args.remote_workers as usize * 2)
            .build()?,
        origin: Instant::now(),
        first: AtomicU64::new(u64::MAX),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        claimed: Mutex::new(HashMap::new()),
    });
    let loops: Vec<_> = (0..args.remote_workers)
        .map(|i| tokio::spawn(work(shared.clone(), format!("bench-remote-{i}"))))
        .collect();
    let done_at = wait_completed(&store, &queue, args.jobs, args.json, Some(&shared.done)).await?;
    let first = shared.first.load(Ordering::Relaxed);
    let first = shared.origin + Duration::from_nanos(first);
    let process_secs = done_at.duration_since(first).as_secs_f64();
    let process_jobs_s = args.jobs as f64 / process_secs;
    say(format!(
        "\nprocess: {} jobs in {:.3} s = {:.0} jobs/s",
        args.jobs, process_secs, process_jobs_s
    ));

    // Phase 3: latency, one enqueue every G ms while the workers wait in their long-poll.
    let gap = Duration::from_millis(args.latency_gap_ms);
    let mut sent = HashMap::new();
    let mut next = tokio::time::Instant::now();
    for seq in 0..args.latency_jobs {
        tokio::time::sleep_until(next).await;
        next += gap;
        sent.insert(seq, Instant::now());
        store
            .enqueue(
                NewJob::new("bench.latency", json!({ "seq": seq }))
                    .queue(queue.clone())
                    .idempotency_key(format!("{queue}-lat-{seq}")),
            )
            .await?;
    }
    let all = args.jobs + args.latency_jobs;
    wait_completed(&store, &queue, all, true, Some(&shared.done)).await?;
    shared.stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await??;
    }
    stop_api.cancel();
    api.await??;
    let mut lat: Vec<f64> = {
        let claimed = lock(&shared.claimed);
        sent.iter()
            .filter_map(|(seq, at)| Some(claimed.get(seq)?.duration_since(*at).as_secs_f64() * 1e3))
            .collect()
    };
    if lat.len() != args.latency_jobs as usize {
        bail!(
            "only {} of {} latency jobs were claimed",
            lat.len(),
            args.latency_jobs
        );
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    say(format!(
        "latency: p50 {p50:.2} ms, p99 {p99:.2} ms over {} jobs",
        lat.len()
    ));

    let result = BenchResult {
        system: "conveyor",
        version: env!("CARGO_PKG_VERSION"),
        backend: short_backend(&backend),
        enqueue_jobs_s: round(enqueue_jobs_s, 1),
        process_jobs_s: round(process_jobs_s, 1),
        lat_p50_ms: round(p50, 3),
        lat_p99_ms: round(p99, 3),
        peak_rss_mb: round(peak_rss_mb(), 1),
        config: format!(
            "remote workers over HTTP in this process: {} loops, claim batch {} (long-poll 1 s), one finish call per batch, enqueue batch {}, idempotency keys on",
            args.remote_workers, args.remote_batch, args.enqueue_batch
        ),
    };
    if args.json {
        outln!("{}", serde_json::to_string(&result)?);
    } else {
        outln!(
            "{backend} (remote workers): enqueue {:.0} jobs/s, process {:.0} jobs/s, latency p50 {:.2} ms / p99 {:.2} ms, peak RSS {:.1} MB",
            result.enqueue_jobs_s,
            result.process_jobs_s,
            result.lat_p50_ms,
            result.lat_p99_ms,
            result.peak_rss_mb
        );
    }
    Ok(())
}

/// One HTTP worker: claim a batch, report it done in one call, until told to stop.
async fn work(shared: Arc<Shared>, worker_id: String) -> anyhow::Result<()> {
    while !shared.stop.load(Ordering::Relaxed) {
        let at = shared.origin.elapsed().as_nanos() as u64;
        shared.first.fetch_min(at, Ordering::Relaxed);
        let answer = post(
            &shared,
            "/v1/workers/claim",
            &json!({"worker_id": worker_id, "queues": [shared.queue], "limit": shared.batch,
                    "lease_seconds": 60, "wait_seconds": 1}),
        )
        .await?;
        let received = Instant::now();
        let jobs = answer["jobs"]
            .as_array()
            .context("claim answered no jobs array")?;
        if jobs.is_empty() {
            continue;
        }
        let mut items = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job["kind"] == "bench.latency"
                && let Some(seq) = job["args"]["seq"].as_u64()
            {
                lock(&shared.claimed).entry(seq).or_insert(received);
            }
            items.push(json!({"id": job["id"], "attempt": job["attempt"], "outcome": "complete"}));
        }
        let n = items.len() as u64;
        let answer = post(
            &shared,
            "/v1/workers/finish",
            &json!({"worker_id": worker_id, "items": items}),
        )
        .await?;
        let applied = answer["items"]
            .as_array()
            .context("finish answered no items array")?
            .iter()
            .filter(|i| i["status"] == 200)
            .count() as u64;
        if applied != n {
            bail!("{worker_id}: only {applied} of {n} outcomes applied: {answer}");
        }
        shared.done.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

async fn post(shared: &Shared, path: &str, body: &Value) -> anyhow::Result<Value> {
    let response = shared
        .http
        .post(format!("{}{path}", shared.base))
        .bearer_auth(&shared.token)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status();
    let answer: Value = response
        .json()
        .await
        .with_context(|| format!("POST {path}"))?;
    if !status.is_success() {
        bail!("POST {path}: {status}: {answer}");
    }
    Ok(answer)
}
