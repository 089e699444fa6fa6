//! `conveyor bench`: the shared benchmark protocol against a real store and the real runtime.
//!
//! 1. Enqueue: with no worker running, bulk-enqueue N no-op jobs → `enqueue_jobs_s`.
//! 2. Process: start a worker; from the first job's start until the store counts all N jobs
//!    `completed` → `process_jobs_s`.
//! 3. Latency: with the worker warm, enqueue M jobs one at a time every G ms; each job records
//!    its start − the instant just before its enqueue call → p50/p99.
//!
//! Postgres under production statistics (see docs/performance.md): `--preload-finished N`
//! first inserts N finished jobs in bulk and runs VACUUM ANALYZE, as autovacuum would after
//! such an insert; `--analyze` runs ANALYZE after phase 1 (statistics that say no job runs)
//! and again mid-run (half the jobs run).
//!
//! The worker is the one `conveyor serve` runs (leases, heartbeats, attempt history, batched
//! completion), and every enqueue carries an idempotency key so the unique index does its
//! real work. Jobs go to a fresh queue (`bench_<id>`) so nothing else in the store is touched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::store::{self, JobFilter, StoreOptions};
use conveyor_worker::{JobContext, JobState, NewJob, Outcome, Registry, Store};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

mod admin;
mod apalis;
mod email;
mod remote;
mod rollups;
mod statistics;
mod webhooks;

/// What the benchmark runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// No-op jobs: the shared protocol.
    #[default]
    Jobs,
    /// Signed webhook deliveries to a local receiver, attempt log on (see docs/webhooks.md).
    Webhooks,
    /// No-op jobs run by remote workers over HTTP: batched claim and finish through the API
    /// in this process (see docs/api.md, Remote workers).
    Remote,
    /// No-op jobs run by an apalis worker (apalis-core's `WorkerBuilder`) on the same store
    /// through `conveyor_apalis` (see docs/apalis.md).
    Apalis,
    /// SMTP sending through lettre's pool beside one connection per message, to a sink in
    /// this process (see docs/email.md); the store is not used.
    Email,
    /// The reads an admin's pages make (counts per queue and state, listings, error-text and
    /// kind filters) on a store filled with `--preload-finished` finished jobs (default
    /// 1,000,000); SQLite and Postgres.
    Admin,
    /// An application rollup (`analytics.rollup` windows, docs/analytics.md) beside the same
    /// aggregation as one SQL statement, over `--jobs` generated events; Postgres only.
    Rollups,
}

/// Which store the benchmark runs on (must match the URL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    /// `sqlite:///path/file.db`
    Sqlite,
    /// `postgres://user@host:port/db`
    Postgres,
    /// `redis://host:port/db`
    Redis,
}

/// Arguments of `conveyor bench`.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Backend kind; must agree with --url.
    #[arg(long, value_enum)]
    pub backend: BenchBackend,
    /// Store URL. The benchmark migrates it and uses a queue of its own.
    #[arg(long)]
    pub url: String,
    /// Jobs in the enqueue and process phases.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: u64,
    /// Jobs in the latency phase.
    #[arg(long, default_value_t = 500)]
    pub latency_jobs: u64,
    /// Gap between latency-phase enqueues, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub latency_gap_ms: u64,
    /// Worker concurrency (jobs running at once).
    #[arg(long, default_value_t = 256)]
    pub concurrency: u32,
    /// Jobs per bulk enqueue call (the shared protocol enqueues in chunks of 1,000).
    #[arg(long, default_value_t = 1_000)]
    pub enqueue_batch: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// What to run.
    #[arg(long, value_enum, default_value = "jobs")]
    pub workload: Workload,
    /// Postgres only: ANALYZE the job table after the enqueue phase, before measuring, and
    /// again mid-run (once half the jobs are claimed), as autovacuum does on its own.
    #[arg(long)]
    pub analyze: bool,
    /// Postgres only: first insert this many finished jobs in bulk (one INSERT … SELECT
    /// generate_series, in a queue of their own), then VACUUM ANALYZE the table, as
    /// autovacuum would after such an insert.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preload_finished: u64,
    /// `--workload remote`: HTTP worker loops.
    #[arg(long, default_value_t = 4)]
    pub remote_workers: u32,
    /// `--workload remote`: jobs per claim (and per finish call), 1 to 1000.
    #[arg(long, default_value_t = 1000)]
    pub remote_batch: u32,
    /// `--workload jobs`: afterwards, summarise the run's minutes into the platform history
    /// (`stats.rollup`, docs/analytics.md) and print its cost: wall time, this process's CPU
    /// time, and both per million finished jobs.
    #[arg(long)]
    pub rollup: bool,
}

/// The result line.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    system: &'static str,
    version: &'static str,
    backend: String,
    enqueue_jobs_s: f64,
    process_jobs_s: f64,
    lat_p50_ms: f64,
    lat_p99_ms: f64,
    peak_rss_mb: f64,
    config: String,
}

/// Runs the protocol and prints the result.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let scheme_ok = match args.backend {
        BenchBackend::Sqlite => args.url.starts_with("sqlite:"),
        BenchBackend::Postgres => {
            args.url.starts_with("postgres://") || args.url.starts_with("postgresql://")
        }
        BenchBackend::Redis => {
            args.url.starts_with("redis://") || args.url.starts_with("rediss://")
        }
    };
    if !scheme_ok {
        bail!(
            "--url {} does not match --backend {:?}",
            store::redact_url(&args.url),
            args.backend
        );
    }
    if args.jobs == 0 || args.concurrency == 0 || args.enqueue_batch == 0 {
        bail!("--jobs, --concurrency and --enqueue-batch must be at least 1");
    }
    if args.workload == Workload::Admin {
        return admin::run(&args).await;
    }
    if args.backend != BenchBackend::Postgres && (args.analyze || args.preload_finished > 0) {
        bail!(
            "--analyze and --preload-finished are for --backend postgres (they run ANALYZE \
             and bulk SQL on the job table); drop them for --backend {}",
            format!("{:?}", args.backend).to_lowercase()
        );
    }
    if !matches!(args.workload, Workload::Jobs | Workload::Apalis)
        && (args.analyze || args.preload_finished > 0)
    {
        bail!("--analyze and --preload-finished apply to --workload jobs and apalis only");
    }

    if args.workload == Workload::Email {
        return email::run(&args).await;
    }

    // Deliveries write an attempt-log record each, concurrently with fetch and completion:
    // they get a larger pool (CONVEYOR_BENCH_POOL overrides, for A/B runs).
    let pool = match args.workload {
        Workload::Jobs
        | Workload::Remote
        | Workload::Apalis
        | Workload::Email
        | Workload::Admin
        | Workload::Rollups => 8,
        Workload::Webhooks => std::env::var("CONVEYOR_BENCH_POOL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32),
    };
    let store = store::connect(
        &args.url,
        StoreOptions {
            max_connections: pool,
            ..StoreOptions::default()
        },
    )
    .await
    .with_context(|| format!("opening {}", store::redact_url(&args.url)))?;
    if args.workload == Workload::Webhooks {
        return webhooks::run(&args, store).await;
    }
    if args.workload == Workload::Remote {
        return remote::run(&args, store).await;
    }
    if args.workload == Workload::Rollups {
        return rollups::run(&args, store).await;
    }
    let backend = store.backend_name().await?;
    let bench_started = store.now().await?;
    let queue = format!("bench_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let say = |msg: String| {
        if !args.json {
            errln!("{msg}");
        }
    };
    say(format!(
        "conveyor bench on {backend}: {} jobs, {} latency jobs every {} ms, concurrency {}",
        args.jobs, args.latency_jobs, args.latency_gap_ms, args.concurrency
    ));
    if args.preload_finished > 0 {
        let took = statistics::preload_finished(
            &args.url,
            args.preload_finished,
            &format!("{queue}_done"),
        )
        .await?;
        say(format!(
            "preload: {} finished jobs inserted, VACUUM ANALYZE done, in {:.1} s",
            args.preload_finished,
            took.as_secs_f64()
        ));
    }

    // Phase 1: bulk enqueue, no worker running.
    let started = Instant::now();
    let mut enqueued = 0u64;
    while enqueued < args.jobs {
        let n = (args.jobs - enqueued).min(args.enqueue_batch as u64);
        let batch: Vec<NewJob> = (enqueued..enqueued + n)
            .map(|i| {
                NewJob::new("bench.noop", serde_json::json!({}))
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

    if args.analyze {
        let took = statistics::analyze(&args.url).await?;
        say(format!(
            "ANALYZE before processing ({} ms)",
            took.as_millis()
        ));
    }

    // Phase 2: process.
    let probe = Arc::new(Probe::new(args.latency_jobs as usize));
    let mut registry = Registry::new();
    let p = probe.clone();
    registry.register(
        "bench.noop",
        move |_: serde_json::Value, _ctx: JobContext| {
            p.first_start();
            p.ran.fetch_add(1, Ordering::Relaxed);
            async { Ok(Outcome::Done) }
        },
    );
    let p = probe.clone();
    registry.register(
        "bench.latency",
        move |args: LatencyArgs, _ctx: JobContext| {
            p.latency_start(args.seq);
            p.ran.fetch_add(1, Ordering::Relaxed);
            async { Ok(Outcome::Done) }
        },
    );
    let fetch_batch = args.concurrency.min(200);
    let (worker, runtime) = if args.workload == Workload::Apalis {
        let (running, describe) =
            apalis::start(&store, &queue, args.concurrency, fetch_batch, probe.clone());
        (Running::Apalis(running), describe)
    } else {
        let config = WorkerConfig {
            queues: vec![QueueConfig {
                name: queue.clone(),
                concurrency: args.concurrency,
            }],
            fetch_batch,
            ..WorkerConfig::default()
        };
        let describe = format!(
            "1 worker process, concurrency {}, fetch batch {fetch_batch}, completion batch <= {}",
            args.concurrency, config.completion_batch
        );
        let shutdown = CancellationToken::new();
        let worker = Worker::new(store.clone(), registry, config)?;
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        (Running::Native(shutdown, handle), describe)
    };
    let mid_run = args.analyze.then(|| {
        tokio::spawn(statistics::analyze_halfway(
            args.url.clone(),
            probe.clone(),
            args.jobs,
        ))
    });

    let done_at = wait_completed(&store, &queue, args.jobs, args.json, Some(&probe.ran)).await?;
    if let Some(mid_run) = mid_run {
        match mid_run.await? {
            Ok(Some(took)) => say(format!("\nANALYZE mid-run ({} ms)", took.as_millis())),
            Ok(None) => say("\nthe run ended before the mid-run ANALYZE".into()),
            Err(e) => return Err(e.context("the mid-run ANALYZE failed")),
        }
    }
    let first = probe.first_start_at().context("no job started")?;
    let process_secs = done_at.duration_since(first).as_secs_f64();
    let process_jobs_s = args.jobs as f64 / process_secs;
    say(format!(
        "\nprocess: {} jobs in {:.3} s = {:.0} jobs/s",
        args.jobs, process_secs, process_jobs_s
    ));

    // Phase 3: latency, one enqueue every G ms with the single-job API.
    let gap = Duration::from_millis(args.latency_gap_ms);
    let mut next = tokio::time::Instant::now();
    // The apalis worker runs one kind; its latency jobs are `bench.noop` with a `seq`.
    let latency_kind = match args.workload {
        Workload::Apalis => "bench.noop",
        _ => "bench.latency",
    };
    for seq in 0..args.latency_jobs as usize {
        tokio::time::sleep_until(next).await;
        next += gap;
        probe.latency_enqueue(seq);
        store
            .enqueue(
                NewJob::new(latency_kind, serde_json::json!({ "seq": seq }))
                    .queue(queue.clone())
                    .idempotency_key(format!("{queue}-lat-{seq}")),
            )
            .await?;
    }
    let all = args.jobs + args.latency_jobs;
    wait_completed(&store, &queue, all, true, Some(&probe.ran)).await?;
    let mut lat = probe.latencies_ms();
    worker.stop().await?;
    if lat.len() != args.latency_jobs as usize {
        bail!(
            "only {} of {} latency jobs recorded a start",
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
    if args.rollup {
        say(rollup_cost(&store, bench_started).await?);
    }

    let result = BenchResult {
        system: match args.workload {
            Workload::Apalis => "conveyor-apalis",
            _ => "conveyor",
        },
        version: env!("CARGO_PKG_VERSION"),
        backend: short_backend(&backend),
        enqueue_jobs_s: round(enqueue_jobs_s, 1),
        process_jobs_s: round(process_jobs_s, 1),
        lat_p50_ms: round(p50, 3),
        lat_p99_ms: round(p99, 3),
        peak_rss_mb: round(peak_rss_mb(), 1),
        config: format!(
            "{runtime}, enqueue batch {}, idempotency keys on{}{}",
            args.enqueue_batch,
            if args.preload_finished > 0 {
                format!(", {} finished jobs preloaded", args.preload_finished)
            } else {
                String::new()
            },
            if args.analyze {
                ", ANALYZE before processing and mid-run"
            } else {
                ""
            }
        ),
    };
    if args.json {
        outln!("{}", serde_json::to_string(&result)?);
    } else {
        outln!(
            "{backend}: enqueue {:.0} jobs/s, process {:.0} jobs/s, latency p50 {:.2} ms / p99 {:.2} ms, peak RSS {:.1} MB",
            result.enqueue_jobs_s,
            result.process_jobs_s,
            result.lat_p50_ms,
            result.lat_p99_ms,
            result.peak_rss_mb
        );
    }
    Ok(())
}

/// The worker the process and latency phases run on.
enum Running {
    Native(
        CancellationToken,
        tokio::task::JoinHandle<conveyor_worker::Result<()>>,
    ),
    Apalis(apalis::Running),
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Running::Native(shutdown, handle) => {
                shutdown.cancel();
                handle.await??;
            }
            Running::Apalis(running) => running.stop().await?,
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct LatencyArgs {
    seq: usize,
}

/// What the bench handlers record. Instants come from one process-wide monotonic clock.
struct Probe {
    origin: Instant,
    /// Nanoseconds after `origin` of the first job start; `u64::MAX` until then.
    first: AtomicU64,
    seen_first: AtomicBool,
    /// Jobs whose handler has returned, both kinds.
    ran: AtomicU64,
    enqueued: Mutex<Vec<Option<Instant>>>,
    started: Mutex<Vec<Option<Instant>>>,
}

impl Probe {
    fn new(latency_jobs: usize) -> Self {
        Self {
            origin: Instant::now(),
            first: AtomicU64::new(u64::MAX),
            seen_first: AtomicBool::new(false),
            ran: AtomicU64::new(0),
            enqueued: Mutex::new(vec![None; latency_jobs]),
            started: Mutex::new(vec![None; latency_jobs]),
        }
    }

    fn first_start(&self) {
        if self.seen_first.load(Ordering::Relaxed) {
            return;
        }
        let at = self.origin.elapsed().as_nanos() as u64;
        self.first.fetch_min(at, Ordering::Relaxed);
        self.seen_first.store(true, Ordering::Relaxed);
    }

    fn first_start_at(&self) -> Option<Instant> {
        let n = self.first.load(Ordering::Relaxed);
        (n != u64::MAX).then(|| self.origin + Duration::from_nanos(n))
    }

    fn latency_enqueue(&self, seq: usize) {
        if let Some(slot) = lock(&self.enqueued).get_mut(seq) {
            *slot = Some(Instant::now());
        }
    }

    fn latency_start(&self, seq: usize) {
        let now = Instant::now();
        if let Some(slot) = lock(&self.started).get_mut(seq) {
            slot.get_or_insert(now);
        }
    }

    fn latencies_ms(&self) -> Vec<f64> {
        let enq = lock(&self.enqueued);
        let st = lock(&self.started);
        enq.iter()
            .zip(st.iter())
            .filter_map(|(e, s)| Some(s.as_ref()?.duration_since(*e.as_ref()?).as_secs_f64() * 1e3))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls the store every 20 ms until none of the queue's `total` jobs is waiting or running,
/// then checks that all of them are `completed`; returns the instant it saw the last one done.
///
/// With `handled` (the handlers' own count of jobs run), the store is polled only once every
/// handler has returned: the counts are not free (after an ANALYZE that saw every job
/// waiting, counting the waiting ones is a sequential scan), and during the run they would
/// compete with the statements being measured. Counting what is left (a few partial-index
/// entries near the end) rather than what is done keeps the remaining polls cheap.
async fn wait_completed(
    store: &Arc<dyn Store>,
    queue: &str,
    total: u64,
    quiet: bool,
    handled: Option<&AtomicU64>,
) -> anyhow::Result<Instant> {
    if let Some(handled) = handled {
        let mut last = 0;
        let mut last_change = Instant::now();
        loop {
            let n = handled.load(Ordering::Relaxed);
            if n >= total {
                break;
            }
            if n != last {
                last = n;
                last_change = Instant::now();
                progress(quiet, "process", n, total);
            } else if last_change.elapsed() > Duration::from_secs(60) {
                bail!("no progress for 60 s: {n} of {total} jobs have run");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Two counts, each matching one partial index: the waiting states, and running.
    let waiting = JobFilter {
        queue: Some(queue.to_string()),
        states: vec![
            JobState::Scheduled,
            JobState::Available,
            JobState::Retryable,
        ],
        ..JobFilter::default()
    };
    let running = JobFilter {
        queue: Some(queue.to_string()),
        states: vec![JobState::Running],
        ..JobFilter::default()
    };
    let mut last_change = Instant::now();
    let mut last = u64::MAX;
    loop {
        // Running first: its index is tiny at the end; the waiting count is read only once
        // nothing runs.
        let left = match store.count(&running).await? {
            0 => store.count(&waiting).await?,
            n => n,
        };
        if left == 0 {
            let seen = Instant::now();
            let completed = JobFilter {
                queue: Some(queue.to_string()),
                states: vec![JobState::Completed],
                ..JobFilter::default()
            };
            let done = store.count(&completed).await?;
            if done != total {
                bail!(
                    "{done} of {total} jobs completed; the others failed (see `conveyor jobs list --queue {queue}`)"
                );
            }
            return Ok(seen);
        }
        if left != last {
            last = left;
            last_change = Instant::now();
            progress(quiet, "process", total.saturating_sub(left), total);
        } else if last_change.elapsed() > Duration::from_secs(60) {
            bail!("no progress for 60 s: {left} of {total} jobs still waiting or running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn progress(quiet: bool, phase: &str, done: u64, total: u64) {
    if quiet {
        return;
    }
    const WIDTH: u64 = 40;
    let filled = (done * WIDTH / total.max(1)) as usize;
    eprint!(
        "\r{phase:>8} [{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(WIDTH as usize - filled)
    );
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// "Postgres 15.19 (Debian …)" → "Postgres 15"; "SQLite 3.46.0" stays.
fn short_backend(name: &str) -> String {
    match name.strip_prefix("Postgres ") {
        Some(v) => format!(
            "Postgres {}",
            v.split(|c: char| !c.is_ascii_digit()).next().unwrap_or(v)
        ),
        None => name.to_string(),
    }
}

/// Runs the platform history's rollup over every minute since `started` (from a fresh
/// progress mark, so earlier runs on the same store do not shorten it) and says what it cost.
/// On Postgres the grouping runs in the database, so the wall time is the figure to read; on
/// SQLite and Redis this process's CPU (SQLite) or the server's script time (Redis, inside
/// the wall time) carry it.
async fn rollup_cost(
    store: &std::sync::Arc<dyn conveyor_worker::Store>,
    started: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<String> {
    use conveyor_analytics::{Rollups, StatsConfig};
    let now = store.now().await?;
    let lookback = (now - started).to_std().unwrap_or_default() + Duration::from_secs(120);
    store
        .meta_delete(
            "stats.state",
            "rollup",
            conveyor_worker::store::meta::Expect::Any,
        )
        .await?;
    let rollups = Rollups::new(
        store.clone(),
        StatsConfig {
            first_run_lookback: lookback,
            max_minutes_per_run: 10_080,
            ..StatsConfig::default()
        },
    );
    let cpu_before = process_cpu_secs();
    let t = Instant::now();
    let report = rollups.run_at(now).await?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu_before;
    let per_million = |x: f64| x * 1e6 / report.jobs.max(1) as f64;
    Ok(format!(
        "rollup: {} finished jobs in {} minutes summarised in {wall:.3} s wall, {cpu:.3} s CPU here \
         ({:.2} s wall and {:.2} CPU-s per million jobs; {} rows written)",
        report.jobs,
        report.minutes,
        per_million(wall),
        per_million(cpu),
        report.rows_written
    ))
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`), in seconds.
fn process_cpu_secs() -> f64 {
    // /proc counts in USER_HZ, which Linux fixes at 100 for every architecture it exposes.
    let ticks = 100.0;
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at state (3rd).
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .map_or(0.0, |t| t / ticks)
}

/// Peak resident set size of this process (Linux `VmHWM`), in MB; 0 where unknown.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_names() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(
            short_backend("Postgres 15.19 (Debian 15.19-0+deb12u1)"),
            "Postgres 15"
        );
        assert_eq!(short_backend("SQLite 3.46.0"), "SQLite 3.46.0");
    }
}
