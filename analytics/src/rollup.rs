//! The `stats.rollup` job: finished jobs → per-minute rows → per-hour rows → per-day rows.
//!
//! A run reads its progress mark (`stats.state/rollup`: the end of the last minute it
//! summarised), then summarises every minute from `lateness` before that mark up to and
//! including the current, unfinished minute, at most `max_minutes_per_run` of them. Each
//! minute is one [`Store::finished_groups`] call over its `[start, end)`; its rows replace the
//! minute's previous rows whole (rows of a queue and kind that no longer appear are deleted).
//! The hours and days those minutes fall in are then merged again from the rows below them.
//! So a window's rows depend only on the jobs in it: running a window again — a retried job,
//! a rescued one, two replicas at once — writes the same rows, and a finish committed late
//! (within `lateness`) is counted when its minute is summarised again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use conveyor_worker::stats::Histogram;
use conveyor_worker::store::meta::{Expect, MetaQuery, Put};
use conveyor_worker::{JobContext, JobState, KindOptions, Outcome, Registry, Store};
use serde::{Deserialize, Serialize};

use crate::config::StatsConfig;
use crate::query::Resolution;

/// The job kind.
pub const KIND: &str = "stats.rollup";

/// Where a run's progress mark is kept.
const STATE: &str = "stats.state";
const STATE_KEY: &str = "rollup";

/// One stored row: a window of one queue and kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Start of the window.
    pub at: DateTime<Utc>,
    /// The queue.
    pub queue: String,
    /// The kind.
    pub kind: String,
    /// Jobs that finished `completed`.
    pub completed: u64,
    /// Jobs that finished `cancelled`.
    pub cancelled: u64,
    /// Jobs that finished `dead`.
    pub dead: u64,
    /// Run times (µs buckets) of the jobs that ran.
    pub run: Histogram,
    /// Waits (µs buckets) of the jobs that ran.
    pub wait: Histogram,
}

impl Row {
    /// Adds `other`'s counts (same queue and kind).
    pub fn merge(&mut self, other: &Row) {
        self.completed += other.completed;
        self.cancelled += other.cancelled;
        self.dead += other.dead;
        self.run.merge(&other.run);
        self.wait.merge(&other.wait);
    }

    /// Finished jobs.
    pub fn finished(&self) -> u64 {
        self.completed + self.cancelled + self.dead
    }
}

/// The kind of webhook deliveries (`conveyor_jobs` registers it; the history only reads its
/// finished jobs).
pub const WEBHOOK_KIND: &str = "webhook.deliver";

/// The endpoint of a delivery sent to a URL directly, without an endpoint.
pub const DIRECT: &str = "direct";

/// One stored webhook row: a window of one endpoint's deliveries (collections
/// `stats.webhooks.1m|1h|1d`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRow {
    /// Start of the window.
    pub at: DateTime<Utc>,
    /// The endpoint id (`direct` for deliveries to a URL).
    pub endpoint: String,
    /// Deliveries that finished delivered (the job completed).
    pub delivered: u64,
    /// Deliveries that finished failed (the job died: a permanent answer or attempts used up).
    pub failed: u64,
    /// Deliveries cancelled.
    pub cancelled: u64,
    /// Attempts of these deliveries, all together.
    pub attempts: u64,
    /// Their last attempt's time (µs buckets), claim to end: the request and its answer.
    pub latency: Histogram,
}

impl WebhookRow {
    /// Adds `other`'s counts (same endpoint).
    pub fn merge(&mut self, other: &WebhookRow) {
        self.delivered += other.delivered;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.attempts += other.attempts;
        self.latency.merge(&other.latency);
    }

    /// Finished deliveries.
    pub fn finished(&self) -> u64 {
        self.delivered + self.failed + self.cancelled
    }

    /// Attempts after a delivery's first: retries.
    pub fn retries(&self) -> u64 {
        self.attempts.saturating_sub(self.latency.count())
    }
}

/// A row kind kept per window: its group's part of the key, and how rows of one group add up.
trait WindowRow: Serialize + serde::de::DeserializeOwned {
    /// The key after the window's part (`queue|kind`, `endpoint`).
    fn group(&self) -> String;
    /// An empty row of the same group at `at`.
    fn empty_at(&self, at: DateTime<Utc>) -> Self;
    /// Adds `other` (same group).
    fn add(&mut self, other: &Self);
}

impl WindowRow for Row {
    fn group(&self) -> String {
        format!("{}|{}", self.queue, self.kind)
    }
    fn empty_at(&self, at: DateTime<Utc>) -> Self {
        Row {
            at,
            queue: self.queue.clone(),
            kind: self.kind.clone(),
            ..Row::default()
        }
    }
    fn add(&mut self, other: &Self) {
        self.merge(other)
    }
}

impl WindowRow for WebhookRow {
    fn group(&self) -> String {
        self.endpoint.clone()
    }
    fn empty_at(&self, at: DateTime<Utc>) -> Self {
        WebhookRow {
            at,
            endpoint: self.endpoint.clone(),
            ..WebhookRow::default()
        }
    }
    fn add(&mut self, other: &Self) {
        self.merge(other)
    }
}

/// The progress mark.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Mark {
    /// Minutes before this are summarised (the last run's current minute included, though
    /// it was still running then).
    summarised_to: DateTime<Utc>,
}

/// What one run did: the job's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupReport {
    /// First minute summarised.
    pub from: DateTime<Utc>,
    /// End of the last minute summarised (exclusive).
    pub to: DateTime<Utc>,
    /// Minutes summarised.
    pub minutes: u32,
    /// Finished jobs counted in them.
    pub jobs: u64,
    /// Rows written, all resolutions.
    pub rows_written: u64,
    /// Rows deleted because their queue and kind no longer appear in a window.
    pub rows_deleted: u64,
    /// Finished webhook deliveries counted in them.
    #[serde(default)]
    pub webhooks: u64,
    /// Whether more minutes are waiting (the run stopped at `max_minutes_per_run`).
    pub behind: bool,
}

/// The rollup service: one per process, shared.
#[derive(Clone)]
pub struct Rollups {
    store: Arc<dyn Store>,
    config: StatsConfig,
}

impl std::fmt::Debug for Rollups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollups")
            .field("config", &self.config)
            .finish()
    }
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

impl Rollups {
    /// Over `store`.
    pub fn new(store: Arc<dyn Store>, config: StatsConfig) -> Self {
        Self { store, config }
    }

    /// The settings.
    pub fn config(&self) -> &StatsConfig {
        &self.config
    }

    /// One run at the store's clock.
    pub async fn run_once(&self) -> conveyor_worker::Result<RollupReport> {
        let now = self.store.now().await?;
        self.run_at(now).await
    }

    /// One run as if the store's clock said `now` (tests drive time with this).
    pub async fn run_at(&self, now: DateTime<Utc>) -> conveyor_worker::Result<RollupReport> {
        let minute = Resolution::Minute;
        let current = minute.floor(now);
        let mark: Option<Mark> = match self.store.meta_get(STATE, STATE_KEY).await? {
            Some(r) => Some(r.decode()?),
            None => None,
        };
        let from = match &mark {
            Some(m) => minute
                .floor(m.summarised_to.min(current + minute.width()) - delta(self.config.lateness)),
            None => minute.floor(now - delta(self.config.first_run_lookback)),
        };
        let limit = from + minute.width() * self.config.max_minutes_per_run as i32;
        let to = (current + minute.width()).min(limit);
        let mut report = RollupReport {
            from,
            to,
            minutes: 0,
            jobs: 0,
            rows_written: 0,
            rows_deleted: 0,
            webhooks: 0,
            behind: to < current + minute.width(),
        };
        let mut at = from;
        while at < to {
            let groups = self.store.finished_groups(at, at + minute.width()).await?;
            let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
            for g in groups {
                let row = rows
                    .entry((g.queue.clone(), g.kind.clone()))
                    .or_insert_with(|| Row {
                        at,
                        queue: g.queue.clone(),
                        kind: g.kind.clone(),
                        ..Row::default()
                    });
                match g.state {
                    JobState::Completed => row.completed += g.count,
                    JobState::Cancelled => row.cancelled += g.count,
                    _ => row.dead += g.count,
                }
                row.run.merge(&g.run);
                row.wait.merge(&g.wait);
                report.jobs += g.count;
            }
            self.replace(
                minute.collection(),
                minute,
                at,
                rows.into_values().collect(),
                now,
                &mut report,
            )
            .await?;
            let webhooks = self.webhook_rows(at).await?;
            report.webhooks += webhooks.iter().map(WebhookRow::finished).sum::<u64>();
            self.replace(
                webhook_collection(minute),
                minute,
                at,
                webhooks,
                now,
                &mut report,
            )
            .await?;
            report.minutes += 1;
            at += minute.width();
        }
        // Hours, then days, merged again from the rows below them.
        for (res, below) in [
            (Resolution::Hour, Resolution::Minute),
            (Resolution::Day, Resolution::Hour),
        ] {
            let mut window = res.floor(from);
            while window < to {
                let rows: Vec<Row> = self.merged(below.collection(), res, window).await?;
                self.replace(res.collection(), res, window, rows, now, &mut report)
                    .await?;
                let rows: Vec<WebhookRow> =
                    self.merged(webhook_collection(below), res, window).await?;
                self.replace(webhook_collection(res), res, window, rows, now, &mut report)
                    .await?;
                window += res.width();
            }
        }
        let mark = serde_json::to_value(Mark { summarised_to: to })?;
        self.store
            .meta_put(Put::new(STATE, STATE_KEY, &mark))
            .await?;
        Ok(report)
    }

    /// One minute's webhook rows: the finished `webhook.deliver` jobs per endpoint. A backend
    /// that cannot group by an args field keeps none.
    async fn webhook_rows(&self, at: DateTime<Utc>) -> conveyor_worker::Result<Vec<WebhookRow>> {
        let groups = match self
            .store
            .finished_groups_by_arg(
                WEBHOOK_KIND,
                "endpoint_id",
                at,
                at + Resolution::Minute.width(),
            )
            .await
        {
            Ok(groups) => groups,
            Err(conveyor_worker::Error::Unsupported(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut rows: BTreeMap<String, WebhookRow> = BTreeMap::new();
        for g in groups {
            let endpoint = g.value.unwrap_or_else(|| DIRECT.to_owned());
            let row = rows.entry(endpoint.clone()).or_insert_with(|| WebhookRow {
                at,
                endpoint,
                ..WebhookRow::default()
            });
            match g.state {
                JobState::Completed => row.delivered += g.count,
                JobState::Cancelled => row.cancelled += g.count,
                _ => row.failed += g.count,
            }
            row.attempts += g.attempts;
            row.latency.merge(&g.run);
        }
        Ok(rows.into_values().collect())
    }

    /// The rows of `res` window `window`, merged from the rows inside it in `below` (a
    /// collection of the finer resolution).
    async fn merged<R: WindowRow>(
        &self,
        below: &str,
        res: Resolution,
        window: DateTime<Utc>,
    ) -> conveyor_worker::Result<Vec<R>> {
        let mut merged: BTreeMap<String, R> = BTreeMap::new();
        let prefix = res.key_prefix(window);
        let mut query = MetaQuery {
            prefix: Some(prefix),
            after: None,
            limit: 1000,
            descending: false,
        };
        loop {
            let page = self.store.meta_list(below, &query).await?;
            for record in &page {
                let row: R = record.decode()?;
                merged
                    .entry(row.group())
                    .or_insert_with(|| row.empty_at(window))
                    .add(&row);
            }
            match page.last() {
                Some(last) if page.len() == query.limit as usize => {
                    query.after = Some(last.key.clone())
                }
                _ => break,
            }
        }
        Ok(merged.into_values().collect())
    }

    /// Writes `rows` as window `at` of `res`, deleting the window's other rows.
    async fn replace<R: WindowRow>(
        &self,
        collection: &str,
        res: Resolution,
        at: DateTime<Utc>,
        rows: Vec<R>,
        now: DateTime<Utc>,
        report: &mut RollupReport,
    ) -> conveyor_worker::Result<()> {
        let keep = delta(self.config.keep(res));
        let expires = at + res.width() + keep;
        let Ok(ttl) = (expires - now).to_std() else {
            return Ok(()); // already past its retention: nothing to keep
        };
        let keys: Vec<String> = rows
            .iter()
            .map(|r| format!("{}|{}", res.key_prefix(at), r.group()))
            .collect();
        let existing = self
            .store
            .meta_list(
                collection,
                &MetaQuery {
                    prefix: Some(format!("{}|", res.key_prefix(at))),
                    after: None,
                    limit: 1000,
                    descending: false,
                },
            )
            .await?;
        for record in existing {
            if !keys.contains(&record.key) {
                self.store
                    .meta_delete(collection, &record.key, Expect::Any)
                    .await?;
                report.rows_deleted += 1;
            }
        }
        let values = rows
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        let puts: Vec<Put<'_>> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| Put::new(collection, k, v).ttl(ttl))
            .collect();
        for chunk in puts.chunks(500) {
            self.store.meta_put_many(chunk).await?;
        }
        report.rows_written += puts.len() as u64;
        Ok(())
    }
}

/// The collection of webhook rows of `res`.
pub fn webhook_collection(res: Resolution) -> &'static str {
    match res {
        Resolution::Minute => "stats.webhooks.1m",
        Resolution::Hour => "stats.webhooks.1h",
        Resolution::Day => "stats.webhooks.1d",
    }
}

impl StatsConfig {
    /// How long rows of `res` are kept.
    pub fn keep(&self, res: Resolution) -> Duration {
        match res {
            Resolution::Minute => self.keep_minutes,
            Resolution::Hour => self.keep_hours,
            Resolution::Day => self.keep_days,
        }
    }
}

/// Registers `stats.rollup`: a run's [`RollupReport`] is the job's result. Its timeout is
/// generous (a catch-up run reads many minutes); a failed run is retried like any job and
/// changes nothing it did not finish.
pub fn register(registry: &mut Registry, rollups: Arc<Rollups>) {
    let options = KindOptions {
        timeout: Some(Duration::from_secs(600)),
        ..KindOptions::default()
    };
    registry.register_with(
        KIND,
        options,
        move |_args: serde_json::Value, _ctx: JobContext| {
            let rollups = rollups.clone();
            async move {
                let report = rollups.run_once().await?;
                tracing::debug!(?report, "stats rolled up");
                Ok(Outcome::DoneWith(serde_json::to_value(report)?))
            }
        },
    );
}
