//! `[stats]`: the platform history's settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[stats]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatsConfig {
    /// Keep the history: `serve` with the scheduler role stores the `conveyor.stats` schedule
    /// that runs `stats.rollup` every minute. Off: nothing is summarised (old rows still expire).
    pub enabled: bool,
    /// How long after a minute ends its finishes may still arrive (a batch committed late, a
    /// store clock behind): each run summarises this much of the past again. Must stay below
    /// the pruner's shortest retention, so the jobs are still there when re-read.
    #[serde(with = "humantime_serde")]
    pub lateness: Duration,
    /// Per-minute rows are kept this long.
    #[serde(with = "humantime_serde")]
    pub keep_minutes: Duration,
    /// Per-hour rows are kept this long.
    #[serde(with = "humantime_serde")]
    pub keep_hours: Duration,
    /// Per-day rows are kept this long.
    #[serde(with = "humantime_serde")]
    pub keep_days: Duration,
    /// On the first run (no history yet), how far back to summarise the jobs still stored.
    #[serde(with = "humantime_serde")]
    pub first_run_lookback: Duration,
    /// The most minutes one run summarises; a run that falls behind (the scheduler was down)
    /// catches up over the next runs.
    pub max_minutes_per_run: u32,
    /// The queue the `stats.rollup` jobs are enqueued on.
    pub queue: String,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lateness: Duration::from_secs(5 * 60),
            keep_minutes: Duration::from_secs(48 * 3600),
            keep_hours: Duration::from_secs(90 * 86_400),
            keep_days: Duration::from_secs(2 * 365 * 86_400),
            first_run_lookback: Duration::from_secs(3600),
            max_minutes_per_run: 240,
            queue: "default".into(),
        }
    }
}

impl StatsConfig {
    /// Checks the settings against each other and against the pruner's shortest retention;
    /// the message names the key and what would fix it.
    pub fn check(&self, shortest_retention: Duration) -> Result<(), String> {
        if self.lateness < Duration::from_secs(60) {
            return Err(format!(
                "stats.lateness: must be at least 1m (got {}): a minute is summarised again until it is this old",
                humantime::format_duration(self.lateness)
            ));
        }
        if self.lateness >= shortest_retention {
            return Err(format!(
                "stats.lateness ({}) must be shorter than the pruner's shortest retention ({}): \
                 a minute summarised again after its jobs were pruned would lose them; \
                 lower stats.lateness or raise maintenance.pruner's retention",
                humantime::format_duration(self.lateness),
                humantime::format_duration(shortest_retention)
            ));
        }
        if self.keep_minutes < Duration::from_secs(2 * 3600) {
            return Err(
                "stats.keep_minutes: must be at least 2h (hours are merged from minutes)".into(),
            );
        }
        if self.keep_hours < Duration::from_secs(2 * 86_400) {
            return Err(
                "stats.keep_hours: must be at least 2d (days are merged from hours)".into(),
            );
        }
        if !(1..=10_080).contains(&self.max_minutes_per_run) {
            return Err(format!(
                "stats.max_minutes_per_run: must be between 1 and 10080, got {}",
                self.max_minutes_per_run
            ));
        }
        Ok(())
    }
}
