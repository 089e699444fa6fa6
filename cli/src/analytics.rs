//! `conveyor analytics`: the application's rollups — `backfill` (one idempotent job per
//! window, resumable) and `status` — and the wiring `serve` uses (their schedules, the kind,
//! its queue).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use conveyor_analytics::application::{self, AnalyticsConfig, RollupArgs, Rollups};
use conveyor_scheduler::schedule::{MissedPolicy, OverlapPolicy, ScheduleSpec};
use conveyor_worker::Store;
use conveyor_worker::runtime::{QueueConfig, WorkerConfig};

use crate::cli::OutputArgs;
use crate::config::{Config, ConfigError};
use crate::output;

/// `conveyor analytics …`
#[derive(Debug, Subcommand)]
pub enum AnalyticsCommand {
    /// Enqueue one job per window of a period not yet written (`analytics.rollup`, each under
    /// its window's idempotency key): run it again after a crash and it enqueues only what is
    /// missing. Windows not complete yet are left to the schedule.
    Backfill(BackfillArgs),
    /// A rollup's watermark, lag, last error, windows done and jobs pending.
    Status {
        /// The rollup (`[analytics.rollups.NAME]`).
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `conveyor analytics backfill`.
#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// The rollup (`[analytics.rollups.NAME]`).
    pub name: String,
    /// Start of the period (RFC 3339), rounded down to a window's start.
    #[arg(long)]
    pub from: DateTime<Utc>,
    /// End of the period (RFC 3339, default now), rounded up to a window's end.
    #[arg(long)]
    pub to: Option<DateTime<Utc>>,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Each rollup's database URL: its own, or that of the `[backup.sources]` it names.
pub fn database_urls(config: &Config) -> Result<BTreeMap<String, String>, ConfigError> {
    config
        .analytics
        .database_urls(&|name| source_url(config, name))
        .map_err(ConfigError)
}

/// The Postgres URL of `[backup.sources.<name>]`.
pub fn source_url(config: &Config, name: &str) -> Option<Result<String, String>> {
    use conveyor_backup::config::SourceConfig;
    match config.backup.sources.get(name)? {
        SourceConfig::Postgres { url, .. } => Some(Ok(url.clone())),
        SourceConfig::Sqlite { .. } => Some(Err(format!(
            "[backup.sources.{name}] is a SQLite database; rollups read Postgres"
        ))),
    }
}

/// The rollup service over `store`.
pub fn service(config: &Config, store: Arc<dyn Store>) -> Result<Arc<Rollups>, ConfigError> {
    Ok(Arc::new(Rollups::new(
        config.analytics.clone(),
        database_urls(config)?,
        store,
    )))
}

/// The schedules `serve` keeps, one per rollup: `analytics.<name>` runs the windows due.
/// A missed tick needs no job of its own (the next run starts from the watermark), and runs
/// of one rollup never overlap.
pub fn schedules(config: &AnalyticsConfig) -> Vec<ScheduleSpec> {
    config
        .rollups
        .iter()
        .map(|(name, r)| ScheduleSpec {
            name: format!("analytics.{name}"),
            cron: r.schedule.clone(),
            timezone: "UTC".into(),
            queue: config.queue.clone(),
            kind: application::KIND.into(),
            args: serde_json::to_value(RollupArgs {
                name: name.clone(),
                window_start: None,
            })
            .unwrap_or_default(),
            priority: 0,
            max_attempts: 3,
            enabled: true,
            missed: MissedPolicy::Skip,
            backfill_limit: 1,
            overlap: OverlapPolicy::Skip,
        })
        .collect()
}

/// Registers `analytics.rollup` and makes sure the worker serves its queue.
pub fn register(
    registry: &mut conveyor_worker::Registry,
    worker: &mut WorkerConfig,
    rollups: Arc<Rollups>,
) {
    let queue = rollups.config().queue.clone();
    application::register(registry, rollups);
    if !worker.queues.iter().any(|q| q.name == queue) {
        worker.queues.push(QueueConfig {
            name: queue,
            concurrency: 2,
        });
    }
}

/// Runs `conveyor analytics …`.
pub async fn run(rollups: &Rollups, cmd: AnalyticsCommand) -> Result<()> {
    match cmd {
        AnalyticsCommand::Backfill(args) => backfill(rollups, args).await,
        AnalyticsCommand::Status { name, out } => {
            let status = rollups.status(&name).await?;
            if out.json {
                return output::json(&status);
            }
            let time = |t: Option<DateTime<Utc>>| t.map_or("-".into(), output::time);
            outln!(
                "rollup {} → {} ({} windows, lateness {})",
                status.name,
                status.target,
                status.window,
                status.lateness
            );
            outln!("  watermark     {}", time(status.watermark));
            outln!(
                "  lag           {}",
                status.lag_seconds.map_or("-".into(), |s| {
                    humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string()
                })
            );
            outln!("  last run      {}", time(status.last_run_at));
            outln!(
                "  windows done  {} ({} → {}), {} missing between",
                status.windows_done,
                time(status.first_window),
                time(status.last_window),
                status.windows_missing
            );
            outln!(
                "  jobs          {} pending, {} dead",
                status.jobs_pending,
                status.jobs_dead
            );
            match &status.last_error {
                Some(e) => outln!(
                    "  last error    {} (window {}): {e}",
                    time(status.last_error_at),
                    time(status.last_error_window)
                ),
                None => outln!("  last error    -"),
            }
            Ok(())
        }
    }
}

async fn backfill(rollups: &Rollups, args: BackfillArgs) -> Result<()> {
    let to = args.to.unwrap_or_else(Utc::now);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !args.out.json;
    let bar = if tty {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} windows ({eta} left)",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("backfill {}", args.name));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = rollups
        .backfill(&args.name, args.from, to, &mut progress)
        .await;
    bar.finish_and_clear();
    let report = report?;
    if args.out.json {
        return output::json(&report);
    }
    outln!(
        "backfill {}: {} windows {} → {}: {} enqueued, {} already enqueued, {} already done",
        report.name,
        report.windows,
        output::time(report.from),
        output::time(report.to),
        report.enqueued,
        report.already_enqueued,
        report.done
    );
    outln!(
        "  follow it with `conveyor analytics status {}`",
        report.name
    );
    Ok(())
}
