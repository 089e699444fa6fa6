//! Reading the history: a period's series and totals, the same for the API and the CLI.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use conveyor_worker::stats::{Histogram, RELATIVE_ERROR};
use conveyor_worker::store::meta::MetaQuery;
use conveyor_worker::{Error, Store};
use serde::{Deserialize, Serialize};

use crate::config::StatsConfig;
use crate::rollup::{Row, WebhookRow, webhook_collection};

/// The most points one answer holds.
pub const MAX_POINTS: i64 = 10_000;

/// The automatic choice keeps a series at most this long, picking a coarser resolution.
const AUTO_POINTS: i64 = 1_500;

/// A row width.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// One row per minute.
    Minute,
    /// One row per hour.
    Hour,
    /// One row per day (UTC).
    Day,
}

impl Resolution {
    /// Finest first.
    pub const ALL: [Resolution; 3] = [Resolution::Minute, Resolution::Hour, Resolution::Day];

    /// The width of one window.
    pub fn width(self) -> TimeDelta {
        match self {
            Resolution::Minute => TimeDelta::minutes(1),
            Resolution::Hour => TimeDelta::hours(1),
            Resolution::Day => TimeDelta::days(1),
        }
    }

    /// The start of the window holding `t`.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.width()).unwrap_or(t)
    }

    /// The store collection of its rows.
    pub fn collection(self) -> &'static str {
        match self {
            Resolution::Minute => "stats.1m",
            Resolution::Hour => "stats.1h",
            Resolution::Day => "stats.1d",
        }
    }

    /// The window's part of a row key. Sorts as time does, and a coarser window's prefix is a
    /// prefix of every finer window's inside it.
    pub fn key_prefix(self, at: DateTime<Utc>) -> String {
        match self {
            Resolution::Minute => at.format("%Y%m%dT%H%M").to_string(),
            Resolution::Hour => at.format("%Y%m%dT%H").to_string(),
            Resolution::Day => at.format("%Y%m%d").to_string(),
        }
    }

    /// A row's key.
    pub fn key(self, at: DateTime<Utc>, queue: &str, kind: &str) -> String {
        format!("{}|{queue}|{kind}", self.key_prefix(at))
    }
}

impl std::str::FromStr for Resolution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minute" | "1m" => Ok(Resolution::Minute),
            "hour" | "1h" => Ok(Resolution::Hour),
            "day" | "1d" => Ok(Resolution::Day),
            _ => Err(format!(
                "`{s}` is not a resolution: use minute, hour or day"
            )),
        }
    }
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resolution::Minute => "minute",
            Resolution::Hour => "hour",
            Resolution::Day => "day",
        })
    }
}

/// What to read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsQuery {
    /// Start (inclusive; floored to the resolution).
    pub from: Option<DateTime<Utc>>,
    /// End (exclusive; default now).
    pub to: Option<DateTime<Utc>>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Row width; default the finest that still covers `from` in at most 1,500 points.
    pub resolution: Option<Resolution>,
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Percentiles {
    /// Observations.
    pub count: u64,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

impl Percentiles {
    fn of(h: &Histogram) -> Self {
        let ms = |q| h.quantile(q).map(|us| us.round() / 1000.0);
        Self {
            count: h.count(),
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
        }
    }
}

/// Totals over a period (or for one queue and kind in it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Summary {
    /// The queue, in a per-queue-and-kind summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The kind, in a per-queue-and-kind summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Finished `completed`.
    pub completed: u64,
    /// Finished `cancelled`.
    pub cancelled: u64,
    /// Finished `dead`.
    pub dead: u64,
    /// Finished jobs per second over the period.
    pub per_second: f64,
    /// `dead` / (`completed` + `dead`); `None` with neither.
    pub failure_rate: Option<f64>,
    /// Run time of the jobs that ran (last attempt, claim to end).
    pub run: Percentiles,
    /// Wait of the jobs that ran (last attempt, due to claimed).
    pub wait: Percentiles,
}

impl Summary {
    fn of(row: &Row, seconds: f64) -> Self {
        let failed_or_done = row.completed + row.dead;
        Self {
            queue: None,
            kind: None,
            completed: row.completed,
            cancelled: row.cancelled,
            dead: row.dead,
            per_second: if seconds > 0.0 {
                row.finished() as f64 / seconds
            } else {
                0.0
            },
            failure_rate: (failed_or_done > 0).then(|| row.dead as f64 / failed_or_done as f64),
            run: Percentiles::of(&row.run),
            wait: Percentiles::of(&row.wait),
        }
    }
}

/// One window of the series.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Point {
    /// Start of the window.
    pub at: DateTime<Utc>,
    /// Finished `completed`.
    pub completed: u64,
    /// Finished `cancelled`.
    pub cancelled: u64,
    /// Finished `dead`.
    pub dead: u64,
    /// Median run time (ms).
    pub run_p50_ms: Option<f64>,
    /// 95th-percentile run time (ms).
    pub run_p95_ms: Option<f64>,
    /// 95th-percentile wait (ms).
    pub wait_p95_ms: Option<f64>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatsReport {
    /// Start of the first window.
    pub from: DateTime<Utc>,
    /// End of the period (exclusive).
    pub to: DateTime<Utc>,
    /// Row width used.
    pub resolution: Resolution,
    /// How far a percentile may be from the exact one (relative), from the buckets' width.
    pub percentile_error: f64,
    /// The whole period.
    pub total: Summary,
    /// Per queue and kind, most finished first.
    pub groups: Vec<Summary>,
    /// One point per window, oldest first, empty windows included.
    pub points: Vec<Point>,
}

/// Reads `query` at `now` (the store's clock).
pub async fn read(
    store: &Arc<dyn Store>,
    config: &StatsConfig,
    query: &StatsQuery,
    now: DateTime<Utc>,
) -> conveyor_worker::Result<StatsReport> {
    let (to, resolution) = plan(config, query, now)?;
    let from = query.from.unwrap_or(to - TimeDelta::hours(1));
    let start = resolution.floor(from);
    let mut windows: BTreeMap<DateTime<Utc>, Row> = BTreeMap::new();
    let mut groups: BTreeMap<(String, String), Row> = BTreeMap::new();
    let end_prefix = resolution.key_prefix(to);
    let mut page_query = MetaQuery {
        prefix: None,
        after: Some(resolution.key_prefix(start)),
        limit: 1000,
        descending: false,
    };
    'pages: loop {
        let page = store
            .meta_list(resolution.collection(), &page_query)
            .await?;
        for record in &page {
            let window = record.key.split('|').next().unwrap_or_default();
            // Keys sort by window: past the window holding `to`, nothing more is wanted.
            if window > end_prefix.as_str() {
                break 'pages;
            }
            let row: Row = record.decode()?;
            if row.at >= to
                || query.queue.as_ref().is_some_and(|q| *q != row.queue)
                || query.kind.as_ref().is_some_and(|k| *k != row.kind)
            {
                continue;
            }
            windows.entry(row.at).or_default().merge(&row);
            groups
                .entry((row.queue.clone(), row.kind.clone()))
                .or_insert_with(|| Row {
                    queue: row.queue.clone(),
                    kind: row.kind.clone(),
                    ..Row::default()
                })
                .merge(&row);
        }
        match page.last() {
            Some(last) if page.len() == page_query.limit as usize => {
                page_query.after = Some(last.key.clone())
            }
            _ => break,
        }
    }
    let seconds = (to - start).num_milliseconds() as f64 / 1000.0;
    let mut total = Row::default();
    for row in windows.values() {
        total.merge(row);
    }
    let mut group_summaries: Vec<Summary> = groups
        .values()
        .map(|row| Summary {
            queue: Some(row.queue.clone()),
            kind: Some(row.kind.clone()),
            ..Summary::of(row, seconds)
        })
        .collect();
    group_summaries.sort_by(|a, b| {
        (b.completed + b.cancelled + b.dead).cmp(&(a.completed + a.cancelled + a.dead))
    });
    let mut points_out = Vec::new();
    let mut at = start;
    while at < to {
        let point = match windows.get(&at) {
            Some(row) => Point {
                at,
                completed: row.completed,
                cancelled: row.cancelled,
                dead: row.dead,
                run_p50_ms: row.run.quantile(0.5).map(|us| us / 1000.0),
                run_p95_ms: row.run.quantile(0.95).map(|us| us / 1000.0),
                wait_p95_ms: row.wait.quantile(0.95).map(|us| us / 1000.0),
            },
            None => Point {
                at,
                ..Point::default()
            },
        };
        points_out.push(point);
        at += resolution.width();
    }
    Ok(StatsReport {
        from: start,
        to,
        resolution,
        percentile_error: RELATIVE_ERROR,
        total: Summary::of(&total, seconds),
        groups: group_summaries,
        points: points_out,
    })
}

/// The end and resolution of `query` at `now`: the rules every history read shares.
fn plan(
    config: &StatsConfig,
    query: &StatsQuery,
    now: DateTime<Utc>,
) -> conveyor_worker::Result<(DateTime<Utc>, Resolution)> {
    let to = query.to.unwrap_or(now);
    let from = query.from.unwrap_or(to - TimeDelta::hours(1));
    if from >= to {
        return Err(Error::invalid(
            "from",
            format!("must be before `to` ({from} is not before {to})"),
        ));
    }
    let points = |r: Resolution| {
        ((to - r.floor(from)).num_seconds() + r.width().num_seconds() - 1) / r.width().num_seconds()
    };
    let resolution = match query.resolution {
        Some(r) => {
            if points(r) > MAX_POINTS {
                return Err(Error::invalid(
                    "resolution",
                    format!(
                        "the period holds {} {r}s, more than the {MAX_POINTS} points one answer holds: choose a coarser resolution or a shorter period",
                        points(r)
                    ),
                ));
            }
            r
        }
        None => Resolution::ALL
            .into_iter()
            .find(|&r| {
                let kept = TimeDelta::from_std(config.keep(r)).unwrap_or(TimeDelta::MAX);
                now - from <= kept && points(r) <= AUTO_POINTS
            })
            .unwrap_or(Resolution::Day),
    };
    if points(resolution) > MAX_POINTS {
        return Err(Error::invalid(
            "from",
            format!(
                "the period holds {} {resolution}s, more than the {MAX_POINTS} points one answer holds: start it later",
                points(resolution)
            ),
        ));
    }
    Ok((to, resolution))
}

/// One endpoint's deliveries over a period (or all endpoints').
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookSummary {
    /// The endpoint id (`direct`: deliveries to a URL), in a per-endpoint summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Deliveries that finished delivered.
    pub delivered: u64,
    /// Deliveries that finished failed (a permanent answer or attempts used up).
    pub failed: u64,
    /// Deliveries cancelled.
    pub cancelled: u64,
    /// Attempts of these deliveries, all together.
    pub attempts: u64,
    /// Attempts after a delivery's first.
    pub retries: u64,
    /// Finished deliveries per second over the period.
    pub per_second: f64,
    /// `failed` / (`delivered` + `failed`); `None` with neither.
    pub failure_rate: Option<f64>,
    /// The last attempt's time, claim to end (the request and its answer).
    pub latency: Percentiles,
}

impl WebhookSummary {
    fn of(row: &WebhookRow, seconds: f64) -> Self {
        let decided = row.delivered + row.failed;
        Self {
            endpoint: None,
            delivered: row.delivered,
            failed: row.failed,
            cancelled: row.cancelled,
            attempts: row.attempts,
            retries: row.retries(),
            per_second: if seconds > 0.0 {
                row.finished() as f64 / seconds
            } else {
                0.0
            },
            failure_rate: (decided > 0).then(|| row.failed as f64 / decided as f64),
            latency: Percentiles::of(&row.latency),
        }
    }
}

/// One window of the webhook series.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookPoint {
    /// Start of the window.
    pub at: DateTime<Utc>,
    /// Delivered.
    pub delivered: u64,
    /// Failed.
    pub failed: u64,
    /// Attempts after a delivery's first.
    pub retries: u64,
    /// Median latency (ms).
    pub latency_p50_ms: Option<f64>,
    /// 95th-percentile latency (ms).
    pub latency_p95_ms: Option<f64>,
}

/// The webhook answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookReport {
    /// Start of the first window.
    pub from: DateTime<Utc>,
    /// End of the period (exclusive).
    pub to: DateTime<Utc>,
    /// Row width used.
    pub resolution: Resolution,
    /// How far a percentile may be from the exact one (relative), from the buckets' width.
    pub percentile_error: f64,
    /// The whole period.
    pub total: WebhookSummary,
    /// Per endpoint, most finished first.
    pub endpoints: Vec<WebhookSummary>,
    /// One point per window, oldest first, empty windows included.
    pub points: Vec<WebhookPoint>,
}

/// Reads webhook deliveries per endpoint for `query`'s period at `now` (`queue` and `kind`
/// are not used; `endpoint`, when given, keeps one endpoint).
pub async fn read_webhooks(
    store: &Arc<dyn Store>,
    config: &StatsConfig,
    query: &StatsQuery,
    endpoint: Option<&str>,
    now: DateTime<Utc>,
) -> conveyor_worker::Result<WebhookReport> {
    let (to, resolution) = plan(config, query, now)?;
    let from = query.from.unwrap_or(to - TimeDelta::hours(1));
    let start = resolution.floor(from);
    let mut windows: BTreeMap<DateTime<Utc>, WebhookRow> = BTreeMap::new();
    let mut groups: BTreeMap<String, WebhookRow> = BTreeMap::new();
    let end_prefix = resolution.key_prefix(to);
    let collection = webhook_collection(resolution);
    let mut page_query = MetaQuery {
        prefix: None,
        after: Some(resolution.key_prefix(start)),
        limit: 1000,
        descending: false,
    };
    'pages: loop {
        let page = store.meta_list(collection, &page_query).await?;
        for record in &page {
            let window = record.key.split('|').next().unwrap_or_default();
            if window > end_prefix.as_str() {
                break 'pages;
            }
            let row: WebhookRow = record.decode()?;
            if row.at >= to || endpoint.is_some_and(|e| e != row.endpoint) {
                continue;
            }
            windows.entry(row.at).or_default().merge(&row);
            groups
                .entry(row.endpoint.clone())
                .or_insert_with(|| WebhookRow {
                    endpoint: row.endpoint.clone(),
                    ..WebhookRow::default()
                })
                .merge(&row);
        }
        match page.last() {
            Some(last) if page.len() == page_query.limit as usize => {
                page_query.after = Some(last.key.clone())
            }
            _ => break,
        }
    }
    let seconds = (to - start).num_milliseconds() as f64 / 1000.0;
    let mut total = WebhookRow::default();
    for row in windows.values() {
        total.merge(row);
    }
    let mut endpoints: Vec<WebhookSummary> = groups
        .values()
        .map(|row| WebhookSummary {
            endpoint: Some(row.endpoint.clone()),
            ..WebhookSummary::of(row, seconds)
        })
        .collect();
    endpoints.sort_by(|a, b| {
        (b.delivered + b.failed + b.cancelled).cmp(&(a.delivered + a.failed + a.cancelled))
    });
    let mut points = Vec::new();
    let mut at = start;
    while at < to {
        points.push(match windows.get(&at) {
            Some(row) => WebhookPoint {
                at,
                delivered: row.delivered,
                failed: row.failed,
                retries: row.retries(),
                latency_p50_ms: row.latency.quantile(0.5).map(|us| us / 1000.0),
                latency_p95_ms: row.latency.quantile(0.95).map(|us| us / 1000.0),
            },
            None => WebhookPoint {
                at,
                ..WebhookPoint::default()
            },
        });
        at += resolution.width();
    }
    Ok(WebhookReport {
        from: start,
        to,
        resolution,
        percentile_error: RELATIVE_ERROR,
        total: WebhookSummary::of(&total, seconds),
        endpoints,
        points,
    })
}

/// The start of a period given as `from` or as a length (`period`, e.g. `15m`, `7d`) ending
/// at `to` (default `now`): the rule the API's `from`/`period` parameters and the CLI's
/// `--from`/`--period` flags share. `Ok(None)`: neither (the default hour).
pub fn period_start(
    from: Option<DateTime<Utc>>,
    period: Option<&str>,
    to: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> conveyor_worker::Result<Option<DateTime<Utc>>> {
    match (from, period) {
        (Some(_), Some(_)) => Err(Error::invalid(
            "period",
            "give either `from` or `period`, not both",
        )),
        (Some(from), None) => Ok(Some(from)),
        (None, Some(text)) => {
            let d = humantime::parse_duration(text).map_err(|e| {
                Error::invalid(
                    "period",
                    format!("`{text}` is not a period ({e}): write e.g. `15m`, `24h` or `7d`"),
                )
            })?;
            if d.is_zero() {
                return Err(Error::invalid("period", "must be longer than zero"));
            }
            let length = TimeDelta::from_std(d).map_err(|_| {
                Error::invalid(
                    "period",
                    format!("`{text}` is longer than any kept history"),
                )
            })?;
            Ok(Some(to.unwrap_or(now) - length))
        }
        (None, None) => Ok(None),
    }
}
