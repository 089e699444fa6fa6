//! The platform history on every backend: jobs run by a real worker (completed, dead after a
//! permanent failure, cancelled before running), summarised by `stats.rollup` into minute,
//! hour and day rows, checked against the raw jobs read back from the store; running the same
//! windows again writes the same rows; the history survives pruning of the raw jobs; the
//! percentiles read from it agree with percentiles computed from the raw jobs within the
//! buckets' stated error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use conveyor_analytics::query::{self, Resolution, StatsQuery};
use conveyor_analytics::rollup::Row;
use conveyor_analytics::{Rollups, StatsConfig};
use conveyor_tests::{backend_tests, eventually};
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::stats::{Histogram, RELATIVE_ERROR};
use conveyor_worker::store::meta::MetaQuery;
use conveyor_worker::store::{JobFilter, Page, RetentionPolicy};
use conveyor_worker::{Job, JobContext, JobError, JobState, NewJob, Outcome, Registry, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const JOBS: u64 = 120;

/// Runs `JOBS` jobs of two kinds on two queues with run times from 0 to ~40 ms; every
/// seventh fails for good; three more are cancelled before they run.
async fn run_jobs(s: &Arc<dyn Store>) {
    let mut registry = Registry::new();
    for kind in ["report.build", "mail.digest"] {
        registry.register(
            kind,
            |args: serde_json::Value, _ctx: JobContext| async move {
                let ms = args["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if args["fail"].as_bool() == Some(true) {
                    return Ok(Outcome::Fail(JobError::new("refused for good")));
                }
                Ok(Outcome::Done)
            },
        );
    }
    let mut jobs = Vec::new();
    for i in 0..JOBS {
        let (queue, kind) = if i % 3 == 0 {
            ("reports", "report.build")
        } else {
            ("mail", "mail.digest")
        };
        jobs.push(NewJob::new(kind, json!({"ms": (i * 7) % 41, "fail": i % 7 == 3})).queue(queue));
    }
    s.enqueue_many(jobs).await.unwrap();
    // Never run: cancelled while scheduled an hour ahead.
    for _ in 0..3 {
        let later = NewJob::new("report.build", json!({}))
            .queue("reports")
            .run_at(Utc::now() + TimeDelta::hours(1));
        let id = s.enqueue(later).await.unwrap().id;
        s.cancel(id).await.unwrap();
    }
    let config = WorkerConfig {
        queues: ["reports", "mail"]
            .iter()
            .map(|q| QueueConfig {
                name: (*q).into(),
                concurrency: 8,
            })
            .collect(),
        poll_interval: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(s.clone(), registry, config).unwrap();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    eventually(60, "every job to finish", || {
        let s = s.clone();
        async move {
            let f = JobFilter {
                states: vec![JobState::Completed, JobState::Dead, JobState::Cancelled],
                ..JobFilter::default()
            };
            (s.count(&f).await.unwrap() == JOBS + 3).then_some(())
        }
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
}

async fn finished_jobs(s: &Arc<dyn Store>) -> Vec<Job> {
    let mut all = Vec::new();
    let mut page = Page {
        before: None,
        limit: 1000,
    };
    let filter = JobFilter {
        states: vec![JobState::Completed, JobState::Dead, JobState::Cancelled],
        ..JobFilter::default()
    };
    loop {
        let jobs = s.list(&filter, page).await.unwrap();
        let done = jobs.len() < 1000;
        page.before = jobs.last().map(|j| j.id);
        all.extend(jobs);
        if done {
            return all;
        }
    }
}

/// The rows the raw jobs imply, per minute: what the rollup must have written.
fn expected_minutes(jobs: &[Job]) -> BTreeMap<String, Row> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for j in jobs {
        let fin = j.finalized_at.unwrap();
        let at = Resolution::Minute.floor(fin);
        let row = rows
            .entry(Resolution::Minute.key(at, &j.queue, &j.kind))
            .or_insert_with(|| Row {
                at,
                queue: j.queue.clone(),
                kind: j.kind.clone(),
                ..Row::default()
            });
        match j.state {
            JobState::Completed => row.completed += 1,
            JobState::Cancelled => row.cancelled += 1,
            _ => row.dead += 1,
        }
        if let Some(a) = j.attempted_at {
            row.run.record((fin - a).num_microseconds().unwrap());
            row.wait.record((a - j.run_at).num_microseconds().unwrap());
        }
    }
    rows
}

async fn stored(s: &Arc<dyn Store>, res: Resolution) -> BTreeMap<String, Row> {
    let records = s
        .meta_list(
            res.collection(),
            &MetaQuery {
                limit: 1000,
                ..MetaQuery::default()
            },
        )
        .await
        .unwrap();
    records
        .into_iter()
        .map(|r| (r.key.clone(), r.decode::<Row>().unwrap()))
        .collect()
}

/// Two histograms whose every observation lies at most one bucket apart (a value on a
/// bucket's edge may round either way in another language's floating point).
fn histograms_agree(a: &Histogram, b: &Histogram) -> bool {
    if a.count() != b.count() {
        return false;
    }
    let expand = |h: &Histogram| -> Vec<i32> {
        h.0.iter()
            .flat_map(|(&b, &n)| std::iter::repeat_n(b, n as usize))
            .collect()
    };
    expand(a)
        .iter()
        .zip(expand(b))
        .all(|(x, y)| (x - y).abs() <= 1)
}

async fn rollups_match_the_raw_jobs(s: Arc<dyn Store>) {
    let started = s.now().await.unwrap();
    run_jobs(&s).await;
    let jobs = finished_jobs(&s).await;
    assert_eq!(jobs.len() as u64, JOBS + 3);
    let expected = expected_minutes(&jobs);

    let rollups = Rollups::new(s.clone(), StatsConfig::default());
    let now = s.now().await.unwrap();
    let report = rollups.run_at(now).await.unwrap();
    assert_eq!(report.jobs, JOBS + 3, "{report:?}");
    assert!(
        report.from <= Resolution::Minute.floor(started),
        "{report:?}"
    );
    assert!(!report.behind);

    let minutes = stored(&s, Resolution::Minute).await;
    assert_eq!(
        minutes.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, want) in &expected {
        let got = &minutes[key];
        assert_eq!(
            (got.at, got.completed, got.cancelled, got.dead),
            (want.at, want.completed, want.cancelled, want.dead),
            "{key}"
        );
        assert!(
            histograms_agree(&got.run, &want.run),
            "{key} run: {:?} vs {:?}",
            got.run,
            want.run
        );
        assert!(histograms_agree(&got.wait, &want.wait), "{key} wait");
    }
    let cancelled: u64 = minutes.values().map(|r| r.cancelled).sum();
    let dead: u64 = minutes.values().map(|r| r.dead).sum();
    assert_eq!(cancelled, 3);
    assert_eq!(dead, (0..JOBS).filter(|i| i % 7 == 3).count() as u64);

    // Hours and days hold the same totals, per queue and kind.
    for res in [Resolution::Hour, Resolution::Day] {
        let mut by_group: BTreeMap<(String, String), (u64, u64, u64, u64)> = BTreeMap::new();
        for r in stored(&s, res).await.values() {
            let e = by_group
                .entry((r.queue.clone(), r.kind.clone()))
                .or_default();
            *e = (
                e.0 + r.completed,
                e.1 + r.cancelled,
                e.2 + r.dead,
                e.3 + r.run.count(),
            );
        }
        let mut want: BTreeMap<(String, String), (u64, u64, u64, u64)> = BTreeMap::new();
        for r in expected.values() {
            let e = want.entry((r.queue.clone(), r.kind.clone())).or_default();
            *e = (
                e.0 + r.completed,
                e.1 + r.cancelled,
                e.2 + r.dead,
                e.3 + r.run.count(),
            );
        }
        assert_eq!(by_group, want, "{res}");
    }

    // The same windows again: the same rows, nothing deleted.
    let again = rollups.run_at(now).await.unwrap();
    assert_eq!(again.rows_deleted, 0);
    assert_eq!(stored(&s, Resolution::Minute).await, minutes);

    // Percentiles from the history against the exact ones from the raw jobs.
    let config = StatsConfig::default();
    let q = StatsQuery {
        from: Some(started - TimeDelta::minutes(1)),
        to: Some(now + TimeDelta::minutes(1)),
        resolution: Some(Resolution::Minute),
        ..StatsQuery::default()
    };
    let read = query::read(&s, &config, &q, now).await.unwrap();
    assert_eq!(
        read.total.completed + read.total.dead + read.total.cancelled,
        JOBS + 3
    );
    let mut runs: Vec<i64> = jobs
        .iter()
        .filter_map(|j| {
            Some(
                (j.finalized_at? - j.attempted_at?)
                    .num_microseconds()
                    .unwrap(),
            )
        })
        .collect();
    runs.sort_unstable();
    for (p, got) in [
        (0.5, read.total.run.p50_ms),
        (0.95, read.total.run.p95_ms),
        (0.99, read.total.run.p99_ms),
    ] {
        let rank = ((p * runs.len() as f64).ceil() as usize).max(1);
        let exact_ms = runs[rank - 1].max(1) as f64 / 1000.0;
        let got = got.unwrap();
        // One bucket of slack for edge rounding on top of the stated error.
        let tolerance = (1.0 + RELATIVE_ERROR) * 2f64.powf(1.0 / 8.0) - 1.0;
        assert!(
            (got - exact_ms).abs() / exact_ms <= tolerance,
            "p{p}: history says {got} ms, raw jobs {exact_ms} ms"
        );
    }
    let by_queue: Vec<_> = read
        .groups
        .iter()
        .map(|g| (g.queue.clone().unwrap(), g.kind.clone().unwrap()))
        .collect();
    assert_eq!(by_queue.len(), 2, "{by_queue:?}");
    let only_reports = query::read(
        &s,
        &config,
        &StatsQuery {
            queue: Some("reports".into()),
            ..q.clone()
        },
        now,
    )
    .await
    .unwrap();
    assert_eq!(
        only_reports.total.completed + only_reports.total.dead + only_reports.total.cancelled,
        (0..JOBS).filter(|i| i % 3 == 0).count() as u64 + 3
    );

    // Pruned raw jobs leave the history as it was.
    let everything = RetentionPolicy {
        completed: Duration::ZERO,
        cancelled: Duration::ZERO,
        dead: Duration::ZERO,
        idempotency: Duration::ZERO,
    };
    let pruned = s
        .prune(now + TimeDelta::seconds(1), &everything, 10_000)
        .await
        .unwrap();
    assert_eq!(pruned, JOBS + 3);
    let after = query::read(&s, &config, &q, now).await.unwrap();
    assert_eq!(after.total, read.total);
    assert_eq!(after.points, read.points);
}

async fn windows_catch_up_and_expire(s: Arc<dyn Store>) {
    // A run long after the last: it summarises at most `max_minutes_per_run` minutes and says
    // it is behind; the next run carries on from there.
    let config = StatsConfig {
        max_minutes_per_run: 30,
        first_run_lookback: Duration::from_secs(3600),
        ..StatsConfig::default()
    };
    let rollups = Rollups::new(s.clone(), config);
    let t0: DateTime<Utc> = s.now().await.unwrap();
    let first = rollups.run_at(t0).await.unwrap();
    assert_eq!(first.minutes, 30);
    assert!(first.behind);
    let second = rollups.run_at(t0).await.unwrap();
    assert_eq!(second.from, first.to - TimeDelta::minutes(5));
    assert_eq!(second.minutes, 30);
    let third = rollups.run_at(t0).await.unwrap();
    assert!(!third.behind, "{third:?}");
    assert_eq!(
        third.to,
        Resolution::Minute.floor(t0) + TimeDelta::minutes(1)
    );
    // An hour later with nothing finished: no rows appear, and a minute already beyond its
    // retention is not written at all.
    assert!(stored(&s, Resolution::Minute).await.is_empty());
}

/// 2,500 jobs finished by one store call share one `finalized_at`: more than one chunk of the
/// Redis summary script, which must carry on inside the instant without counting any twice.
async fn one_instant_holding_many_jobs_counts_each_once(s: Arc<dyn Store>) {
    const N: usize = 2_500;
    let jobs: Vec<NewJob> = (0..N)
        .map(|i| NewJob::new("bulk.item", json!({"i": i})).queue("bulk"))
        .collect();
    s.enqueue_many(jobs).await.unwrap();
    let mut claimed = Vec::new();
    while claimed.len() < N {
        let got = s
            .fetch(conveyor_worker::store::FetchRequest {
                queue: "bulk",
                limit: 1000,
                worker: "w1",
                lease: Duration::from_secs(300),
            })
            .await
            .unwrap();
        assert!(!got.is_empty());
        claimed.extend(got);
    }
    let now = Utc::now();
    let finishes: Vec<_> = claimed
        .iter()
        .map(|j| conveyor_worker::store::Finish {
            id: j.id,
            attempt: j.attempt,
            state: JobState::Completed,
            run_at: None,
            attempt_delta: 0,
            record: conveyor_worker::AttemptRecord {
                attempt: j.attempt,
                started_at: j.attempted_at.unwrap_or(now),
                finished_at: now,
                worker: Some("w1".into()),
                outcome: conveyor_worker::AttemptOutcome::Completed,
                error: None,
                causes: vec![],
                duration_ms: 1,
                traceback: None,
            },
            result: None,
        })
        .collect();
    assert_eq!(s.finish(finishes).await.unwrap(), N as u64);
    let at = s.now().await.unwrap();
    let groups = s
        .finished_groups(at - TimeDelta::hours(1), at + TimeDelta::seconds(1))
        .await
        .unwrap();
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].count, N as u64);
    assert_eq!(groups[0].run.count(), N as u64);
    assert_eq!(groups[0].wait.count(), N as u64);
}

backend_tests!(
    rollups_match_the_raw_jobs,
    windows_catch_up_and_expire,
    one_instant_holding_many_jobs_counts_each_once
);

#[tokio::test]
async fn bad_settings_are_refused_with_the_key() {
    let day = Duration::from_secs(86_400);
    let too_late = StatsConfig {
        lateness: Duration::from_secs(2 * 86_400),
        ..StatsConfig::default()
    };
    let err = too_late.check(day).unwrap_err();
    assert!(
        err.contains("stats.lateness") && err.contains("pruner"),
        "{err}"
    );
    assert!(StatsConfig::default().check(day).is_ok());
    let tiny = StatsConfig {
        lateness: Duration::from_secs(10),
        ..StatsConfig::default()
    };
    assert!(tiny.check(day).unwrap_err().contains("at least 1m"));
}

#[tokio::test]
async fn a_period_too_fine_for_one_answer_is_refused() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let now = Utc::now();
    let q = StatsQuery {
        from: Some(now - TimeDelta::days(30)),
        resolution: Some(Resolution::Minute),
        ..StatsQuery::default()
    };
    let err = query::read(&t.store, &StatsConfig::default(), &q, now)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("resolution") && err.contains("coarser"),
        "{err}"
    );
    // Without a resolution, a month is read in hours.
    let q = StatsQuery {
        resolution: None,
        ..q
    };
    let read = query::read(&t.store, &StatsConfig::default(), &q, now)
        .await
        .unwrap();
    assert_eq!(read.resolution, Resolution::Hour);
    assert_eq!(read.points.len(), 30 * 24 + 1);
    // Centuries are refused at any resolution, naming where the period starts.
    let q = StatsQuery {
        from: Some("0422-02-23T21:56:19Z".parse().unwrap()),
        ..q
    };
    let err = query::read(&t.store, &StatsConfig::default(), &q, now)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("from") && err.contains("start it later"),
        "{err}"
    );
    t.cleanup().await;
}
