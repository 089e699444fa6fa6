//! Cron schedules across replicas: three scheduler instances race for every tick of a
//! stored 1-second schedule for 8.5 s, and the store ends up with exactly one job per tick,
//! none missing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_scheduler::CronScheduler;
use conveyor_scheduler::cron::{Config, CronReport};
use conveyor_scheduler::registry::{Origin, Schedules};
use conveyor_scheduler::schedule::{MissedPolicy, OverlapPolicy, ScheduleSpec};
use conveyor_tests::backend_tests;
use conveyor_worker::Store;
use conveyor_worker::store::{JobFilter, Page};
use tokio_util::sync::CancellationToken;

async fn three_schedulers_enqueue_each_tick_exactly_once(s: Arc<dyn Store>) {
    let mut spec = ScheduleSpec::new("every-second", "* * * * * *", "cron.tick");
    // Backfill, so a pass delayed past a tick on a busy machine still enqueues that tick.
    spec.missed = MissedPolicy::All;
    // Stored, as `serve` keeps schedules: every replica reads it from the store.
    Schedules::new(s.clone())
        .create(spec, Origin::Api)
        .await
        .unwrap();
    let config = Config {
        interval: Duration::from_millis(100),
    };
    let stop = CancellationToken::new();
    // Three independent instances: nothing shared but the store, as in three processes.
    let replicas: Vec<_> = (0..3)
        .map(|_| {
            let cron = CronScheduler::from_store(s.clone(), config.clone());
            tokio::spawn(cron.run(stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(8500)).await;
    stop.cancel();
    for r in replicas {
        r.await.unwrap();
    }

    let jobs = s
        .list(
            &JobFilter {
                kind: Some("cron.tick".into()),
                ..JobFilter::default()
            },
            Page {
                before: None,
                limit: 1000,
            },
        )
        .await
        .unwrap();
    let ticks: Vec<DateTime<Utc>> = jobs
        .iter()
        .map(|j| {
            assert_eq!(j.metadata["schedule"], "every-second");
            DateTime::parse_from_rfc3339(j.metadata["tick"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect();
    let distinct: BTreeSet<_> = ticks.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ticks.len(),
        "a tick got two jobs: {ticks:?}"
    );
    assert!(distinct.len() >= 7, "too few ticks in 8.5 s: {distinct:?}");
    let (first, last) = (*distinct.first().unwrap(), *distinct.last().unwrap());
    assert_eq!(
        distinct.len() as i64,
        (last - first).num_seconds() + 1,
        "a tick is missing between {first} and {last}: {distinct:?}"
    );
    for j in &jobs {
        let key = j.idempotency_key.as_deref().unwrap();
        assert!(key.starts_with("schedule:every-second:"), "{key}");
    }
}

async fn overlap_skip_waits_for_the_previous_job(s: Arc<dyn Store>) {
    let mut spec = ScheduleSpec::new("slow", "* * * * * *", "cron.slow");
    spec.overlap = OverlapPolicy::Skip;
    let cron = CronScheduler::new(s.clone(), vec![spec.compile().unwrap()], Config::default());
    let t0: DateTime<Utc> = "2026-11-23T10:00:00.500Z".parse().unwrap();
    let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);

    assert_eq!(
        cron.run_once(t0).await.unwrap(),
        CronReport::default(),
        "starts from now"
    );
    let first = cron.run_once(at(1000)).await.unwrap();
    assert_eq!(first.enqueued, 1);
    // The 10:00:01 job has not run: the 10:00:02 tick is skipped.
    let second = cron.run_once(at(2000)).await.unwrap();
    assert_eq!((second.enqueued, second.skipped_overlap), (0, 1));
    // Once it is finished (here: cancelled), the next tick fires again.
    let pending = s
        .list(
            &JobFilter {
                kind: Some("cron.slow".into()),
                ..JobFilter::default()
            },
            Page::default(),
        )
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    s.cancel(pending[0].id).await.unwrap();
    let third = cron.run_once(at(3000)).await.unwrap();
    assert_eq!(third.enqueued, 1);
}

async fn a_restarted_scheduler_resumes_from_the_store(s: Arc<dyn Store>) {
    let t0: DateTime<Utc> = "2026-11-23T10:00:58Z".parse().unwrap();
    let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
    // 10:02 to 10:05 pass while no scheduler runs: each policy fires some and misses the rest.
    for (name, missed, expect_after_restart, expect_missed) in [
        ("backfill", MissedPolicy::All, 4, 0),
        ("newest", MissedPolicy::Latest, 1, 3),
        ("none", MissedPolicy::Skip, 0, 4),
    ] {
        let mut spec = ScheduleSpec::new(name, "* * * * *", "cron.minutely");
        spec.missed = missed;
        let schedule = spec.compile().unwrap();

        // The first process fires 10:01, then every scheduler is down until 10:05:58.
        let before = CronScheduler::new(s.clone(), vec![schedule.clone()], Config::default());
        assert_eq!(before.run_once(t0).await.unwrap().enqueued, 0);
        assert_eq!(before.run_once(at(3)).await.unwrap().enqueued, 1);
        drop(before);

        // A new process knows nothing but what the store holds.
        let after = CronScheduler::new(s.clone(), vec![schedule.clone()], Config::default());
        let report = after.run_once(at(300)).await.unwrap();
        assert_eq!(report.enqueued, expect_after_restart, "{name}: {report:?}");
        assert_eq!(report.missed, expect_missed, "{name}: {report:?}");
        // Nothing is fired twice, and the next tick follows on; nothing is missed twice.
        let next = after.run_once(at(303)).await.unwrap();
        assert_eq!((next.enqueued, next.missed), (1, 0), "{name}");
        // /metrics reports the same (other backends' runs of this test add to the counts).
        let metrics = conveyor_worker::metrics::global();
        assert!(
            metrics.cron_missed.get(&[name]).get() >= expect_missed,
            "{name}"
        );
        assert!(metrics.cron_fires.get(&[name]).get() >= expect_after_restart + 2);
        assert!(metrics.cron_lag.get(&[name]).count() >= expect_after_restart + 2);
    }
    let mut text = String::new();
    conveyor_worker::metrics::global().render(&mut text);
    assert!(
        text.contains("conveyor_cron_missed_ticks_total{schedule=\"none\"}"),
        "{text}"
    );
    assert!(
        text.contains("conveyor_cron_fire_lag_seconds_bucket{schedule=\"backfill\",le=\"+Inf\"}"),
        "{text}"
    );
    let ticks: Vec<String> = s
        .list(
            &JobFilter {
                tag: Some("schedule:backfill".into()),
                ..JobFilter::default()
            },
            Page::default(),
        )
        .await
        .unwrap()
        .iter()
        .map(|j| j.metadata["tick"].as_str().unwrap().to_string())
        .rev()
        .collect();
    assert_eq!(
        ticks,
        [
            "2026-11-23T10:01:00Z",
            "2026-11-23T10:02:00Z",
            "2026-11-23T10:03:00Z",
            "2026-11-23T10:04:00Z",
            "2026-11-23T10:05:00Z",
            "2026-11-23T10:06:00Z",
        ]
    );
}

backend_tests!(
    a_restarted_scheduler_resumes_from_the_store,
    three_schedulers_enqueue_each_tick_exactly_once,
    overlap_skip_waits_for_the_previous_job,
);
