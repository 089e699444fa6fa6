//! `[analytics]` and `[analytics.rollups.<name>]`: the application's rollups as declared.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sql;

/// `[analytics]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// The queue `analytics.rollup` jobs are enqueued on (by the schedules and by
    /// `conveyor analytics backfill`); the worker role serves it.
    pub queue: String,
    /// The most windows one scheduled run aggregates; a rollup that fell behind (the
    /// scheduler was down) catches up over the next runs, or at once with a backfill.
    pub max_windows_per_run: u32,
    /// The rollups, by name (`[analytics.rollups.<name>]`).
    pub rollups: BTreeMap<String, RollupConfig>,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            queue: "default".into(),
            max_windows_per_run: 100,
            rollups: BTreeMap::new(),
        }
    }
}

/// One rollup: a source query over the application's Postgres whose result for each window
/// replaces that window's rows of a target table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupConfig {
    /// The application's database: a `postgres://` URL, or the name of a Postgres source in
    /// `[backup.sources]`.
    pub database: String,
    /// The aggregation, with the window as `:window_start` and `:window_end` (timestamps,
    /// the window is `[start, end)`). Its result columns are named as the target's columns,
    /// and `window_column` among them must fall inside the window.
    pub query: String,
    /// The table a window's rows are written to (`name` or `schema.name`).
    pub target: String,
    /// The target's column that says which window a row belongs to: a window's rows are
    /// those with this column in `[start, end)`.
    #[serde(default = "default_window_column")]
    pub window_column: String,
    /// Window size (whole seconds); windows are aligned to the Unix epoch in UTC
    /// (`1h` windows start on the hour, `1d` windows at midnight UTC).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long after a window ends its events may still arrive: each scheduled run
    /// aggregates again the windows that ended less than this long before the last run.
    #[serde(default, with = "humantime_serde")]
    pub lateness: Duration,
    /// When the scheduled run fires (cron, UTC), stored as the schedule
    /// `analytics.<name>`.
    #[serde(default = "default_schedule")]
    pub schedule: String,
}

fn default_window_column() -> String {
    "window_start".into()
}

fn default_schedule() -> String {
    "* * * * *".into()
}

impl AnalyticsConfig {
    /// Checks every rollup; `source_url(name)` resolves a `[backup.sources]` name to its
    /// Postgres URL (`Err` says why it cannot). The message names the key and the fix.
    pub fn check(
        &self,
        source_url: &dyn Fn(&str) -> Option<Result<String, String>>,
    ) -> Result<(), String> {
        if self.queue.trim().is_empty() {
            return Err("analytics.queue: name a queue".into());
        }
        if !(1..=100_000).contains(&self.max_windows_per_run) {
            return Err(format!(
                "analytics.max_windows_per_run: must be between 1 and 100000, got {}",
                self.max_windows_per_run
            ));
        }
        for (name, rollup) in &self.rollups {
            check_name(name)?;
            rollup.check(name, source_url)?;
        }
        Ok(())
    }

    /// Each rollup's database URL, resolved (see [`AnalyticsConfig::check`]).
    pub fn database_urls(
        &self,
        source_url: &dyn Fn(&str) -> Option<Result<String, String>>,
    ) -> Result<BTreeMap<String, String>, String> {
        self.rollups
            .iter()
            .map(|(name, r)| Ok((name.clone(), r.database_url(name, source_url)?)))
            .collect()
    }
}

/// A rollup's name: it becomes part of a schedule name and of idempotency keys.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "analytics.rollups.{name}: a rollup's name is 1-64 letters, digits, `-` or `_`, starting with a letter or digit"
        ))
    }
}

impl RollupConfig {
    fn check(
        &self,
        name: &str,
        source_url: &dyn Fn(&str) -> Option<Result<String, String>>,
    ) -> Result<(), String> {
        let key = format!("analytics.rollups.{name}");
        self.database_url(name, source_url)?;
        sql::Query::parse(&self.query).map_err(|e| format!("{key}.query: {e}"))?;
        sql::table_name(&self.target).map_err(|e| format!("{key}.target: {e}"))?;
        sql::identifier(&self.window_column).map_err(|e| format!("{key}.window_column: {e}"))?;
        let secs = self.window.as_secs();
        if secs == 0 || self.window.subsec_nanos() != 0 || secs > 31 * 86_400 {
            return Err(format!(
                "{key}.window: must be whole seconds between 1s and 31days, got {}",
                humantime::format_duration(self.window)
            ));
        }
        if self.lateness > Duration::from_secs(366 * 86_400) {
            return Err(format!(
                "{key}.lateness: at most a year, got {}",
                humantime::format_duration(self.lateness)
            ));
        }
        if self.schedule.trim().is_empty() {
            return Err(format!(
                "{key}.schedule: a cron expression such as \"* * * * *\""
            ));
        }
        Ok(())
    }

    /// The database's URL: the `postgres://` URL itself, or the named backup source's.
    pub fn database_url(
        &self,
        name: &str,
        source_url: &dyn Fn(&str) -> Option<Result<String, String>>,
    ) -> Result<String, String> {
        let db = self.database.trim();
        if db.starts_with("postgres://") || db.starts_with("postgresql://") {
            return Ok(db.to_string());
        }
        match source_url(db) {
            Some(Ok(url)) => Ok(url),
            Some(Err(why)) => Err(format!("analytics.rollups.{name}.database = `{db}`: {why}")),
            None => Err(format!(
                "analytics.rollups.{name}.database = `{db}`: neither a postgres:// URL nor the name of a [backup.sources.{db}] Postgres source"
            )),
        }
    }

    /// The window as a signed number of seconds.
    pub fn window_secs(&self) -> i64 {
        self.window.as_secs() as i64
    }
}
