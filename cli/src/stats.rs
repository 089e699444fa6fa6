//! `conveyor stats`: the platform history in the terminal, and the `stats.rollup` wiring
//! `serve` uses (its schedule, its kind, its queue).

use std::sync::Arc;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Args;
use conveyor_analytics::query::{
    self, Percentiles, Resolution, StatsQuery, StatsReport, WebhookReport,
};
use conveyor_analytics::{Rollups, StatsConfig};
use conveyor_scheduler::schedule::{MissedPolicy, OverlapPolicy, ScheduleSpec};
use conveyor_worker::Store;
use conveyor_worker::runtime::{QueueConfig, WorkerConfig};

use crate::cli::OutputArgs;
use crate::output;

/// The schedule `serve` keeps while `[stats] enabled`: `stats.rollup` every minute. A missed
/// minute needs no job of its own (the next run summarises every minute since the last),
/// and runs never overlap.
pub fn schedule(config: &StatsConfig) -> ScheduleSpec {
    ScheduleSpec {
        name: "conveyor.stats".into(),
        cron: "* * * * *".into(),
        timezone: "UTC".into(),
        queue: config.queue.clone(),
        kind: conveyor_analytics::KIND.into(),
        args: serde_json::json!({}),
        priority: 0,
        max_attempts: 3,
        enabled: true,
        missed: MissedPolicy::Skip,
        backfill_limit: 1,
        overlap: OverlapPolicy::Skip,
    }
}

/// Registers `stats.rollup` and makes sure the worker serves its queue.
pub fn register(
    registry: &mut conveyor_worker::Registry,
    worker: &mut WorkerConfig,
    store: Arc<dyn Store>,
    config: &StatsConfig,
) {
    conveyor_analytics::register(registry, Arc::new(Rollups::new(store, config.clone())));
    if !worker.queues.iter().any(|q| q.name == config.queue) {
        worker.queues.push(QueueConfig {
            name: config.queue.clone(),
            concurrency: 1,
        });
    }
}

/// `conveyor stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Length of the period ending now (or at --to), e.g. 15m, 24h, 7d. Default 1h.
    #[arg(long, conflicts_with = "from")]
    pub period: Option<String>,
    /// Start of the period (RFC 3339).
    #[arg(long)]
    pub from: Option<DateTime<Utc>>,
    /// End of the period (RFC 3339; default now).
    #[arg(long)]
    pub to: Option<DateTime<Utc>>,
    /// Only this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Webhook deliveries per endpoint instead of finished jobs.
    #[arg(long, conflicts_with_all = ["queue", "kind"])]
    pub webhooks: bool,
    /// With --webhooks: only this endpoint id (`direct`: deliveries to a URL).
    #[arg(long, requires = "webhooks")]
    pub endpoint: Option<String>,
    /// minute, hour or day (default: the finest kept for the whole period, at most 1,500 points).
    #[arg(long)]
    pub resolution: Option<Resolution>,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Reads and prints the history.
pub async fn run(store: Arc<dyn Store>, config: &StatsConfig, args: StatsArgs) -> Result<()> {
    let now = store.now().await?;
    let from = query::period_start(args.from, args.period.as_deref(), args.to, now)?;
    let q = StatsQuery {
        from,
        to: args.to,
        queue: args.queue,
        kind: args.kind,
        resolution: args.resolution,
    };
    if args.webhooks {
        let report =
            query::read_webhooks(&store, config, &q, args.endpoint.as_deref(), now).await?;
        if args.out.json {
            return output::json(&report);
        }
        print_webhooks(&report);
        return Ok(());
    }
    let report = query::read(&store, config, &q, now).await?;
    if args.out.json {
        return output::json(&report);
    }
    print(&report);
    Ok(())
}

/// `▁▂▃▄▅▆▇█`, one per value, scaled to the largest; `n` values at most (merged evenly).
fn sparkline(values: &[u64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() {
        return String::new();
    }
    let per = values.len().div_ceil(width.max(1));
    let merged: Vec<u64> = values.chunks(per).map(|c| c.iter().sum()).collect();
    let max = merged.iter().copied().max().unwrap_or(0);
    merged
        .iter()
        .map(|&v| {
            if max == 0 || v == 0 {
                ' '
            } else {
                BARS[((v as f64 / max as f64) * 7.0).round() as usize]
            }
        })
        .collect()
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) if v >= 10.0 => format!("{v:.0} ms"),
        Some(v) => format!("{v:.2} ms"),
    }
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {}  p95 {}  p99 {}",
        ms(p.p50_ms),
        ms(p.p95_ms),
        ms(p.p99_ms)
    )
}

fn rate(r: Option<f64>) -> String {
    r.map(|r| format!("{:.2}%", r * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn print(r: &StatsReport) {
    let t = &r.total;
    outln!(
        "finished jobs {} → {} ({} resolution)",
        output::time(r.from),
        output::time(r.to),
        r.resolution
    );
    outln!(
        "  completed {}  dead {}  cancelled {}  {:.2}/s  failure rate {}",
        t.completed,
        t.dead,
        t.cancelled,
        t.per_second,
        rate(t.failure_rate)
    );
    outln!("  run   {}", percentiles(&t.run));
    outln!("  wait  {}", percentiles(&t.wait));
    let finished: Vec<u64> = r
        .points
        .iter()
        .map(|p| p.completed + p.dead + p.cancelled)
        .collect();
    let dead: Vec<u64> = r.points.iter().map(|p| p.dead).collect();
    outln!("  finished │{}│", sparkline(&finished, 60));
    outln!("  dead     │{}│", sparkline(&dead, 60));
    outln!(
        "  (percentiles within ±{:.1}%; run is the last attempt, claim to end; wait is due to claim)",
        r.percentile_error * 100.0
    );
    if r.groups.is_empty() {
        outln!("no finished jobs in this period");
        return;
    }
    let mut table = output::table(&[
        "queue",
        "kind",
        "completed",
        "dead",
        "cancelled",
        "/s",
        "failed",
        "run p50",
        "run p95",
        "run p99",
        "wait p95",
    ]);
    for g in &r.groups {
        table.add_row(vec![
            g.queue.clone().unwrap_or_default(),
            g.kind.clone().unwrap_or_default(),
            g.completed.to_string(),
            g.dead.to_string(),
            g.cancelled.to_string(),
            format!("{:.2}", g.per_second),
            rate(g.failure_rate),
            ms(g.run.p50_ms),
            ms(g.run.p95_ms),
            ms(g.run.p99_ms),
            ms(g.wait.p95_ms),
        ]);
    }
    outln!("{table}");
}

fn print_webhooks(r: &WebhookReport) {
    let t = &r.total;
    outln!(
        "webhook deliveries {} → {} ({} resolution)",
        output::time(r.from),
        output::time(r.to),
        r.resolution
    );
    outln!(
        "  delivered {}  failed {}  cancelled {}  retries {}  {:.2}/s  failure rate {}",
        t.delivered,
        t.failed,
        t.cancelled,
        t.retries,
        t.per_second,
        rate(t.failure_rate)
    );
    outln!("  latency {}", percentiles(&t.latency));
    let delivered: Vec<u64> = r.points.iter().map(|p| p.delivered).collect();
    let failed: Vec<u64> = r.points.iter().map(|p| p.failed).collect();
    outln!("  delivered │{}│", sparkline(&delivered, 60));
    outln!("  failed    │{}│", sparkline(&failed, 60));
    outln!(
        "  (percentiles within ±{:.1}%; latency is the last attempt, claim to end)",
        r.percentile_error * 100.0
    );
    if r.endpoints.is_empty() {
        outln!("no finished webhook deliveries in this period");
        return;
    }
    let mut table = output::table(&[
        "endpoint",
        "delivered",
        "failed",
        "cancelled",
        "retries",
        "/s",
        "failure rate",
        "p50",
        "p95",
        "p99",
    ]);
    for e in &r.endpoints {
        table.add_row(vec![
            e.endpoint.clone().unwrap_or_default(),
            e.delivered.to_string(),
            e.failed.to_string(),
            e.cancelled.to_string(),
            e.retries.to_string(),
            format!("{:.2}", e.per_second),
            rate(e.failure_rate),
            ms(e.latency.p50_ms),
            ms(e.latency.p95_ms),
            ms(e.latency.p99_ms),
        ]);
    }
    outln!("{table}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserved_analytics_kinds_are_the_analytics_crates() {
        assert_eq!(
            conveyor_jobs::ANALYTICS_KINDS,
            [
                conveyor_analytics::KIND,
                conveyor_analytics::application::KIND
            ]
        );
        for kind in conveyor_jobs::ANALYTICS_KINDS {
            assert!(conveyor_jobs::RESERVED_KINDS.contains(&kind));
            let e = conveyor_jobs::check_reserved_names(kind, "default", "webhooks").unwrap_err();
            assert_eq!(e.field, "kind");
        }
    }

    #[test]
    fn sparklines_scale_to_the_largest_and_merge_to_the_width() {
        assert_eq!(sparkline(&[0, 1, 2, 4, 8], 10), " ▂▃▅█");
        assert_eq!(sparkline(&[1, 1, 1, 1], 2), "██");
        assert_eq!(sparkline(&[], 5), "");
    }
}
