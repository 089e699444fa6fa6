//! The cron service: enqueues each schedule's job when its tick comes.
//!
//! Every pass asks each enabled schedule which ticks are due since the last one this process
//! handled, and enqueues one job per tick with the tick's idempotency key
//! (`schedule:<name>:<instant>`). Any number of processes run this service at once: they all
//! enqueue the same ticks, and the store keeps one job per key, so each tick yields exactly
//! one job however many schedulers race for it.
//!
//! Where a schedule left off comes from the store: every tick's job carries the tag
//! `schedule:<name>` and its tick in `metadata.tick`, so a starting scheduler reads the newest
//! such job and resumes after its tick, applying the schedule's
//! [`MissedPolicy`](crate::schedule::MissedPolicy) to ticks missed while every scheduler was
//! down. A schedule with no job left (new, or its jobs pruned) starts from its next tick.
//! After that, each process remembers its own progress.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::store::{JobFilter, Page};
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
            if !progress.contains_key(name) {
                let resumed = self.resume(schedule, now).await?;
                progress.insert(name.clone(), resumed);
            }
            let Some(state) = progress.get_mut(name) else {
                continue;
            };
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

    /// Where `schedule` left off: the tick of its newest job, or `now` if it has none.
    async fn resume(
        &self,
        schedule: &Schedule,
        now: DateTime<Utc>,
    ) -> conveyor_worker::Result<Progress> {
        let newest = self
            .store
            .list(
                &JobFilter {
                    tag: Some(schedule.tag()),
                    ..JobFilter::default()
                },
                Page {
                    before: None,
                    limit: 1,
                },
            )
            .await?;
        let last = newest.first().and_then(|job| {
            let tick = job.metadata.get("tick")?.as_str()?;
            let tick = DateTime::parse_from_rfc3339(tick).ok()?.with_timezone(&Utc);
            Some((tick.min(now), job.id))
        });
        Ok(match last {
            Some((tick, id)) => Progress {
                last: tick,
                last_job: Some(id),
            },
            None => Progress {
                last: now,
                last_job: None,
            },
        })
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
