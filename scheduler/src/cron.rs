//! The cron service: enqueues each schedule's job when its tick comes.
//!
//! Every pass asks each enabled schedule which ticks are due since the last one this process
//! handled, and enqueues one job per tick with the tick's idempotency key
//! (`schedule:<name>:<instant>`). Any number of processes run this service at once: they all
//! enqueue the same ticks, and the store keeps one job per key, so each tick yields exactly
//! one job however many schedulers race for it.
//!
//! This process remembers the last tick it handled per schedule; a new process starts from
//! the next tick. Ticks missed while every scheduler was down are applied per
//! [`MissedPolicy`](crate::schedule::MissedPolicy) only within a process's lifetime until
//! schedules are kept in the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::{JobId, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::schedule::{OverlapPolicy, Schedule};

/// Settings of the cron service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// How often due ticks are looked for (default 250 ms: a tick fires at most this late).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
        }
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CronReport {
    /// Jobs this pass inserted.
    pub enqueued: u64,
    /// Ticks another scheduler had already enqueued (their keys were held).
    pub duplicates: u64,
    /// Ticks skipped because the previous tick's job was still unfinished.
    pub skipped_overlap: u64,
}

struct Progress {
    /// The last tick handled.
    last: DateTime<Utc>,
    /// The job of that tick, for the overlap check.
    last_job: Option<JobId>,
}

/// Enqueues scheduled jobs. Cheap to clone; clones share their progress.
#[derive(Clone)]
pub struct CronScheduler {
    store: Arc<dyn Store>,
    schedules: Arc<Vec<Schedule>>,
    config: Config,
    progress: Arc<Mutex<HashMap<String, Progress>>>,
}

impl CronScheduler {
    /// A scheduler for `schedules` over `store`.
    pub fn new(store: Arc<dyn Store>, schedules: Vec<Schedule>, config: Config) -> Self {
        Self {
            store,
            schedules: Arc::new(schedules),
            config,
            progress: Arc::default(),
        }
    }

    /// One pass at `now`. A schedule seen for the first time starts from `now`: its next
    /// tick is the first it fires.
    pub async fn run_once(&self, now: DateTime<Utc>) -> conveyor_worker::Result<CronReport> {
        let mut report = CronReport::default();
        let mut progress = self.progress.lock().await;
        for schedule in self.schedules.iter() {
            let name = &schedule.spec().name;
            let state = progress.entry(name.clone()).or_insert(Progress {
                last: now,
                last_job: None,
            });
            let ticks = schedule.due(Some(state.last), now);
            let Some(&newest) = ticks.last() else {
                continue;
            };
            if schedule.spec().overlap == OverlapPolicy::Skip
                && let Some(previous) = state.last_job
                && let Some(job) = self.store.get(previous).await?
                && !job.state.is_terminal()
            {
                report.skipped_overlap += ticks.len() as u64;
                state.last = newest;
                continue;
            }
            let jobs = ticks.iter().map(|t| schedule.job(*t)).collect();
            let answers = self.store.enqueue_many(jobs).await?;
            for a in &answers {
                if a.duplicate {
                    report.duplicates += 1;
                } else {
                    report.enqueued += 1;
                }
            }
            tracing::debug!(schedule = %name, ticks = ticks.len(), "schedule fired");
            state.last = newest;
            state.last_job = answers.last().map(|a| a.id);
        }
        Ok(report)
    }

    /// Runs passes every `interval` until `shutdown`. A failed pass is logged and retried at
    /// the next interval; ticks that came due meanwhile follow the missed-tick policy.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.schedules.is_empty() {
            return;
        }
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.run_once(Utc::now()).await {
                tracing::warn!(error = %e, "cron pass failed; retrying at the next interval");
            }
        }
    }
}
