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
//!
//! The schedules come either from the store ([`CronScheduler::from_store`], what `serve`
//! runs: every pass reads the enabled schedules, so creating, pausing, resuming or editing one
//! takes effect within one interval on every replica) or from a fixed list
//! ([`CronScheduler::new`]). A paused schedule fires nothing; once resumed it fires from its
//! next tick, never for ticks that passed while it was paused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::{JobId, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::registry::{Schedules, last_tick_job};
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
    /// Ticks that fired no job and never will: dropped by the schedule's missed-tick policy
    /// (counted up to a limit per pass), or skipped for overlap (also in `skipped_overlap`).
    pub missed: u64,
}

/// Most missed ticks one pass counts per schedule (a schedule every second, down for a day,
/// is not walked tick by tick).
const MISSED_COUNT_LIMIT: usize = 10_000;

struct Progress {
    /// The last tick handled.
    last: DateTime<Utc>,
    /// The job of that tick, for the overlap check.
    last_job: Option<JobId>,
}

#[derive(Clone)]
enum Source {
    Fixed(Arc<Vec<Schedule>>),
    Stored(Schedules),
}

/// Enqueues scheduled jobs. Cheap to clone; clones share their progress.
#[derive(Clone)]
pub struct CronScheduler {
    store: Arc<dyn Store>,
    source: Source,
    config: Config,
    progress: Arc<Mutex<HashMap<String, Progress>>>,
}

impl CronScheduler {
    /// A scheduler for a fixed list of `schedules` over `store`.
    pub fn new(store: Arc<dyn Store>, schedules: Vec<Schedule>, config: Config) -> Self {
        Self {
            store,
            source: Source::Fixed(Arc::new(schedules)),
            config,
            progress: Arc::default(),
        }
    }

    /// A scheduler for the schedules stored in `store` (see [`crate::registry`]).
    pub fn from_store(store: Arc<dyn Store>, config: Config) -> Self {
        Self {
            source: Source::Stored(Schedules::new(store.clone())),
            store,
            config,
            progress: Arc::default(),
        }
    }

    async fn schedules(&self) -> conveyor_worker::Result<Vec<(Schedule, Option<DateTime<Utc>>)>> {
        match &self.source {
            Source::Fixed(list) => Ok(list.iter().map(|s| (s.clone(), None)).collect()),
            Source::Stored(registry) => registry.active().await,
        }
    }

    /// One pass at `now`. A schedule seen for the first time starts from `now`: its next
    /// tick is the first it fires.
    pub async fn run_once(&self, now: DateTime<Utc>) -> conveyor_worker::Result<CronReport> {
        let mut report = CronReport::default();
        let schedules = self.schedules().await?;
        let mut progress = self.progress.lock().await;
        // A schedule paused or deleted since the last pass starts over when it comes back.
        progress.retain(|name, _| schedules.iter().any(|(s, _)| &s.spec().name == name));
        for (schedule, resumed_at) in &schedules {
            let name = &schedule.spec().name;
            if !progress.contains_key(name) {
                let resumed = self.resume(schedule, now).await?;
                progress.insert(name.clone(), resumed);
            }
            let Some(state) = progress.get_mut(name) else {
                continue;
            };
            // Ticks that passed while it was paused are not fired late.
            if let Some(at) = resumed_at
                && *at > state.last
            {
                state.last = (*at).min(now);
            }
            let ticks = schedule.due(Some(state.last), now);
            let metrics = conveyor_worker::metrics::global();
            let Some(&newest) = ticks.last() else {
                // Nothing fires: ticks that came due anyway were dropped by the missed-tick
                // policy. Moving past them counts each once.
                let mut dropped = 0;
                for t in schedule
                    .fires_after(state.last)
                    .take_while(|t| *t <= now)
                    .take(MISSED_COUNT_LIMIT)
                {
                    dropped += 1;
                    state.last = t;
                }
                if dropped > 0 {
                    metrics.cron_missed.get(&[name]).add(dropped);
                    report.missed += dropped;
                }
                continue;
            };
            // Ticks up to the newest that fires and that do not fire are missed for good.
            let passed = schedule
                .fires_after(state.last)
                .take_while(|t| *t <= newest)
                .take(MISSED_COUNT_LIMIT)
                .count();
            let dropped = passed.saturating_sub(ticks.len()) as u64;
            if dropped > 0 {
                metrics.cron_missed.get(&[name]).add(dropped);
                report.missed += dropped;
            }
            if schedule.spec().overlap == OverlapPolicy::Skip
                && let Some(previous) = state.last_job
                && let Some(job) = self.store.get(previous).await?
                && !job.state.is_terminal()
            {
                report.skipped_overlap += ticks.len() as u64;
                report.missed += ticks.len() as u64;
                metrics.cron_missed.get(&[name]).add(ticks.len() as u64);
                state.last = newest;
                continue;
            }
            let jobs = ticks.iter().map(|t| schedule.job(*t)).collect();
            let answers = self.store.enqueue_many(jobs).await?;
            let (fires, lag) = (
                metrics.cron_fires.get(&[name]),
                metrics.cron_lag.get(&[name]),
            );
            for (a, tick) in answers.iter().zip(&ticks) {
                if a.duplicate {
                    report.duplicates += 1;
                } else {
                    report.enqueued += 1;
                    fires.inc();
                    lag.observe((now - *tick).to_std().unwrap_or_default());
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
        let last = last_tick_job(self.store.as_ref(), &schedule.spec().name)
            .await?
            .map(|(tick, id, _)| (tick.min(now), id));
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
        if let Source::Fixed(list) = &self.source
            && list.is_empty()
        {
            return;
        }
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // Ticks are compared with the store's clock, so replicas whose clocks disagree
            // still fire each tick once, on time.
            let pass = match self.store.now().await {
                Ok(now) => self.run_once(now).await,
                Err(e) => Err(e),
            };
            if let Err(e) = pass {
                tracing::warn!(error = %e, "cron pass failed; retrying at the next interval");
            }
        }
    }
}
