//! Conveyor's analytics: the platform's own history, kept after its finished jobs are pruned,
//! and the application's rollups of its own events into summary tables.
//!
//! Where to start reading:
//! - [`rollup`]: the `stats.rollup` job's work. Each run summarises the finished jobs of every
//!   minute since its last run (and again the last few minutes, for finishes committed late)
//!   into one row per minute, queue and kind: counts by outcome and run-time and wait
//!   histograms ([`conveyor_worker::stats`]). Hours are merged from minutes and days from
//!   hours. Rows are written whole, so running a window twice writes the same rows: a retried,
//!   rescued or doubled run changes nothing.
//! - [`query`]: a period's series and totals (throughput, failure rate, percentiles of run
//!   time and wait), read from the finest resolution that still covers the period; the API's
//!   `/v1/stats/jobs` and `conveyor stats` both call it.
//! - [`config`]: `[stats]` — lateness, how long each resolution is kept, the schedule.
//! - [`application`]: the application's rollups (`[analytics.rollups.<name>]`, the
//!   `analytics.rollup` kind): a declared query over the application's Postgres, each
//!   window's result and the watermark written in one transaction of that database, so a
//!   window is counted once however often its job runs; backfills and status.
//!
//! Rows live in the store's shared records (collections `stats.1m`, `stats.1h`, `stats.1d`;
//! webhook deliveries per endpoint in `stats.webhooks.1m|1h|1d`, SQLite and Postgres), on
//! every backend, and expire when their resolution's retention has passed.

pub mod application;
pub mod config;
pub mod query;
pub mod rollup;

pub use config::StatsConfig;
pub use query::{Resolution, StatsQuery, StatsReport};
pub use rollup::{KIND, RollupReport, Rollups, register};
