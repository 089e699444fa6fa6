//! `backup.run` and `backup.prune`: backups on a schedule. A cron schedule names the kind
//! (`kind = "backup.run"`); the job runs the same operation as `conveyor backup create` (or
//! `prune`) and its result is the summary: for `backup.run` the backup's id, source,
//! destination, sizes and duration; for `backup.prune` what was kept and deleted.
//!
//! A configuration problem (an unknown source or destination, a retention that keeps
//! nothing) fails the job at once (`dead`); anything else (the destination unreachable,
//! `pg_dump` failing) is retried with the kind's backoff. An interrupted attempt leaves no
//! backup (it has no manifest), so a retry starts afresh.

use std::sync::Arc;

use conveyor_backup::{Backups, Error};
use conveyor_worker::{JobContext, KindOptions, Outcome, Registry, RetryPolicy};
use serde::{Deserialize, Serialize};

/// The kind that makes a backup.
pub const RUN_KIND: &str = "backup.run";
/// The kind that applies `[backup.retention]`.
pub const PRUNE_KIND: &str = "backup.prune";

/// `backup.run`'s args.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// `store` (default) or a `[backup.sources.<name>]`.
    #[serde(default)]
    pub source: Option<String>,
    /// A `[backup.destinations.<name>]` (default: `backup.destination`).
    #[serde(default)]
    pub destination: Option<String>,
}

/// `backup.prune`'s args.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneArgs {
    /// A `[backup.destinations.<name>]` (default: `backup.destination`).
    #[serde(default)]
    pub destination: Option<String>,
    /// Only report what would be deleted.
    #[serde(default)]
    pub dry_run: bool,
}

/// `backup.run`'s result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// The backup's id.
    pub id: String,
    /// Its source.
    pub source: String,
    /// The destination it was written to.
    pub destination: String,
    /// Bytes read from the source.
    pub raw_bytes: u64,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// How long it took (ms).
    pub duration_ms: i64,
}

fn outcome_of(e: Error) -> Outcome {
    match e {
        Error::Config(_) | Error::NotFound(_) => Outcome::fail(e.to_string()),
        e => Outcome::retry(e.to_string()),
    }
}

/// Registers `backup.run` and `backup.prune`, run with `backups`. No timeout (a backup takes
/// as long as its source needs); retries back off from one minute.
pub fn register(registry: &mut Registry, backups: Arc<Backups>) {
    let options = KindOptions {
        timeout: None,
        retry: RetryPolicy {
            base: std::time::Duration::from_secs(60),
            ..RetryPolicy::default()
        },
    };
    let run = backups.clone();
    registry.register_with(
        RUN_KIND,
        options.clone(),
        move |args: RunArgs, _ctx: JobContext| {
            let backups = run.clone();
            async move {
                let source = args
                    .source
                    .as_deref()
                    .unwrap_or(conveyor_backup::config::STORE_SOURCE);
                let destination = match backups.destination(args.destination.as_deref()) {
                    Ok(d) => d.name().to_string(),
                    Err(e) => return Ok(outcome_of(e)),
                };
                match backups.create(source, Some(&destination)).await {
                    Ok(m) => Ok(Outcome::done_with(&RunResult {
                        raw_bytes: m.raw_bytes(),
                        stored_bytes: m.stored_bytes(),
                        duration_ms: (m.finished_at - m.started_at).num_milliseconds(),
                        id: m.id,
                        source: m.source,
                        destination,
                    })?),
                    Err(e) => Ok(outcome_of(e)),
                }
            }
        },
    );
    registry.register_with(
        PRUNE_KIND,
        options,
        move |args: PruneArgs, _ctx: JobContext| {
            let backups = backups.clone();
            async move {
                match backups
                    .prune(args.destination.as_deref(), args.dry_run)
                    .await
                {
                    Ok(p) => Ok(Outcome::done_with(&p)?),
                    Err(e) => Ok(outcome_of(e)),
                }
            }
        },
    );
}
