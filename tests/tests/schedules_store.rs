//! Schedules kept in the store: config reconciliation (create, update, disable what the file
//! dropped), built-in examples seeded once, versioned edits, and the cron service reading the
//! store — pause stops a schedule, resume fires from the next tick only, manual triggers do
//! not disturb tick tracking, and the status shows last fire, last outcome and next fire.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use conveyor_scheduler::CronScheduler;
use conveyor_scheduler::cron::Config;
use conveyor_scheduler::registry::{self, Origin, Schedules};
use conveyor_scheduler::schedule::ScheduleSpec;
use conveyor_tests::backend_tests;
use conveyor_worker::store::{JobFilter, Page};
use conveyor_worker::{Error, JobState, Store};

async fn reconcile_and_seed(s: Arc<dyn Store>) {
    let reg = Schedules::new(s.clone());

    // Built-in examples: seeded once; a deleted one stays deleted.
    let seeded = reg.seed_builtin(&registry::builtin()).await.unwrap();
    assert_eq!(seeded, ["example-hourly-echo"]);
    let example = reg.require("example-hourly-echo").await.unwrap();
    assert_eq!(example.origin, Origin::Builtin);
    assert!(!example.spec.enabled, "examples start disabled");
    assert!(
        reg.seed_builtin(&registry::builtin())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(reg.delete("example-hourly-echo").await.unwrap());
    assert!(
        reg.seed_builtin(&registry::builtin())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(reg.get("example-hourly-echo").await.unwrap().is_none());

    // One made through the API; reconciliation never touches it.
    reg.create(
        ScheduleSpec::new("mine", "*/5 * * * *", "demo.echo"),
        Origin::Api,
    )
    .await
    .unwrap();

    let a = ScheduleSpec::new("a", "0 3 * * *", "report.build");
    let b = ScheduleSpec::new("b", "0 4 * * *", "report.send");
    let report = reg.reconcile(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(report.created, ["a", "b"]);
    assert!(report.updated.is_empty() && report.disabled.is_empty());
    // A second start with the same file changes nothing.
    let again = reg.reconcile(&[a.clone(), b.clone()]).await.unwrap();
    assert!(again.created.is_empty() && again.updated.is_empty() && again.disabled.is_empty());

    // The file changes `a` and drops `b`: `a` is updated, `b` disabled (kept, with a reason).
    let mut a2 = a.clone();
    a2.cron = "30 3 * * *".into();
    a2.timezone = "Europe/Berlin".into();
    let report = reg.reconcile(std::slice::from_ref(&a2)).await.unwrap();
    assert_eq!(report.updated, ["a"]);
    assert_eq!(report.disabled, ["b"]);
    let stored_a = reg.require("a").await.unwrap();
    assert_eq!(stored_a.spec, a2);
    assert_eq!(stored_a.origin, Origin::Config);
    let stored_b = reg.require("b").await.unwrap();
    assert!(!stored_b.spec.enabled);
    assert_eq!(
        stored_b.disabled_reason.as_deref(),
        Some("removed from the config file")
    );
    assert!(reg.require("mine").await.unwrap().spec.enabled);
    // Back in the file: enabled again.
    let report = reg.reconcile(&[a2.clone(), b.clone()]).await.unwrap();
    assert_eq!(report.updated, ["b"]);
    let stored_b = reg.require("b").await.unwrap();
    assert!(stored_b.spec.enabled && stored_b.disabled_reason.is_none());
    assert!(stored_b.resumed_at.is_some());

    // A bad schedule in the file is refused with the field, and nothing changes.
    let mut bad = a2.clone();
    bad.timezone = "Mars/Olympus".into();
    let err = reg.reconcile(&[bad]).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "timezone"),
        "{err}"
    );
    assert!(reg.require("b").await.unwrap().spec.enabled);

    // Names are unique; edits are versioned; renames are refused.
    let dup = reg
        .create(ScheduleSpec::new("a", "* * * * *", "x"), Origin::Api)
        .await
        .unwrap_err();
    assert!(matches!(dup, Error::Conflict(_)), "{dup}");
    let current = reg.require("mine").await.unwrap();
    let mut edit = current.spec.clone();
    edit.priority = 3;
    reg.update("mine", edit.clone(), Some(current.version))
        .await
        .unwrap();
    let stale = reg
        .update("mine", edit.clone(), Some(current.version))
        .await
        .unwrap_err();
    assert!(matches!(stale, Error::Conflict(_)), "{stale}");
    let mut renamed = edit.clone();
    renamed.name = "yours".into();
    assert!(matches!(
        reg.update("mine", renamed, None).await,
        Err(Error::InvalidInput { .. })
    ));
    let err = reg.require("nope").await.unwrap_err();
    assert!(err.to_string().contains("known: a, b, mine"), "{err}");

    let names: Vec<String> = reg
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    assert_eq!(names, ["a", "b", "mine"]);
}

async fn pause_resume_trigger_and_status(s: Arc<dyn Store>) {
    let reg = Schedules::new(s.clone());
    reg.create(
        ScheduleSpec::new("ticker", "* * * * * *", "cron.store"),
        Origin::Api,
    )
    .await
    .unwrap();
    let cron = CronScheduler::from_store(s.clone(), Config::default());
    let t0: DateTime<Utc> = "2026-11-23T10:00:00.500Z".parse().unwrap();
    let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);

    assert_eq!(
        cron.run_once(t0).await.unwrap().enqueued,
        0,
        "starts from now"
    );
    assert_eq!(cron.run_once(at(1000)).await.unwrap().enqueued, 1);

    // Paused: nothing fires.
    reg.set_enabled_at("ticker", false, at(1200)).await.unwrap();
    assert_eq!(cron.run_once(at(2000)).await.unwrap().enqueued, 0);
    assert_eq!(cron.run_once(at(3000)).await.unwrap().enqueued, 0);

    // Resumed at 10:00:04.2: the ticks of 02, 03 and 04 are not fired late...
    reg.set_enabled_at("ticker", true, at(3700)).await.unwrap();
    assert_eq!(cron.run_once(at(4000)).await.unwrap().enqueued, 0);
    // ...the next one is.
    assert_eq!(cron.run_once(at(5000)).await.unwrap().enqueued, 1);

    // A manual trigger enqueues at once and does not count as a tick.
    let manual = reg.trigger("ticker").await.unwrap();
    assert!(!manual.duplicate);
    let job = s.get(manual.id).await.unwrap().unwrap();
    assert_eq!(job.metadata["trigger"], "manual");
    assert!(job.tags.contains(&"schedule:ticker".to_string()));

    // A scheduler that starts now resumes after the 10:00:05 tick, not from the trigger.
    let fresh = CronScheduler::from_store(s.clone(), Config::default());
    assert_eq!(fresh.run_once(at(5300)).await.unwrap().enqueued, 0);
    assert_eq!(fresh.run_once(at(6000)).await.unwrap().enqueued, 1);

    // Status: last fire, its job's state, next fire.
    let status = reg
        .status(reg.require("ticker").await.unwrap(), at(6000))
        .await
        .unwrap();
    assert_eq!(
        status.last_fire,
        Some("2026-11-23T10:00:06Z".parse().unwrap())
    );
    assert_eq!(status.last_state, Some(JobState::Available));
    assert_eq!(
        status.next_fire,
        Some("2026-11-23T10:00:07Z".parse().unwrap())
    );
    s.cancel(status.last_job.unwrap()).await.unwrap();
    let status = reg
        .status(reg.require("ticker").await.unwrap(), at(6000))
        .await
        .unwrap();
    assert_eq!(status.last_state, Some(JobState::Cancelled));

    let ticks: Vec<String> = s
        .list(
            &JobFilter {
                kind: Some("cron.store".into()),
                ..JobFilter::default()
            },
            Page::default(),
        )
        .await
        .unwrap()
        .iter()
        .filter_map(|j| j.metadata["tick"].as_str().map(str::to_string))
        .rev()
        .collect();
    assert_eq!(
        ticks,
        [
            "2026-11-23T10:00:01Z",
            "2026-11-23T10:00:05Z",
            "2026-11-23T10:00:06Z"
        ]
    );

    // Deleted: the scheduler stops firing it, its jobs stay.
    assert!(reg.delete("ticker").await.unwrap());
    assert_eq!(fresh.run_once(at(8000)).await.unwrap().enqueued, 0);
    assert_eq!(
        s.count(&JobFilter {
            kind: Some("cron.store".into()),
            ..JobFilter::default()
        })
        .await
        .unwrap(),
        4
    );
}

backend_tests!(reconcile_and_seed, pause_resume_trigger_and_status);
