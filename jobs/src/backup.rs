//! `backup.run`, `backup.verify` and `backup.prune`: backups on a schedule or asked for over
//! the API. A cron schedule names the kind (`kind = "backup.run"`), and `POST /v1/backups`
//! (and `/v1/backups/{id}/verify`, `/v1/backups/prune`) enqueue them; the job runs the same
//! operation as `conveyor backup create` (or `verify`, `prune`) and its result is the
//! summary: for `backup.run` the backup's id, source, destination, sizes and duration; for
//! `backup.verify` what was checked; for `backup.prune` what was kept and deleted.
//!
//! The three kinds are reserved ([`crate::RESERVED_KINDS`]): a client cannot enqueue them
//! through `POST /v1/jobs` or schedule them through `/v1/schedules`; the backup routes
//! (admin scope) and the config's `[[schedules]]` can.
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
/// The kind that verifies a backup (and, with `restore`, restores a scratch copy).
pub const VERIFY_KIND: &str = "backup.verify";
/// Every backup kind.
pub const KINDS: [&str; 3] = [RUN_KIND, VERIFY_KIND, PRUNE_KIND];

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

/// `backup.verify`'s args.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyArgs {
    /// The backup's id.
    pub id: String,
    /// A `[backup.destinations.<name>]` (default: `backup.destination`).
    #[serde(default)]
    pub destination: Option<String>,
    /// Also restore into a scratch copy and compare its tables (`verify --restore`).
    #[serde(default)]
    pub restore: bool,
}

/// `backup.verify`'s result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyResult {
    /// The backup.
    pub id: String,
    /// Its source.
    pub source: String,
    /// Whether a scratch copy was restored and its tables compared.
    pub restored: bool,
    /// Stored bytes read (0 when not reported).
    pub stored_bytes: u64,
    /// Decoded bytes.
    pub raw_bytes: u64,
    /// Tables compared with the manifest (with `restore`).
    pub tables: usize,
    /// Encrypted objects whose stored bytes were checked but not decoded: the worker has
    /// no `backup.identity_file`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undecoded: Vec<String>,
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

/// Registers `backup.run`, `backup.verify` and `backup.prune`, run with `backups`. No timeout (a backup takes
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
    let verify = backups.clone();
    registry.register_with(
        VERIFY_KIND,
        options.clone(),
        move |args: VerifyArgs, _ctx: JobContext| {
            let backups = verify.clone();
            async move {
                let destination = args.destination.as_deref();
                let result = if args.restore {
                    backups
                        .verify_restore(&args.id, destination)
                        .await
                        .map(|r| VerifyResult {
                            id: r.id,
                            source: r.source,
                            restored: true,
                            stored_bytes: 0,
                            raw_bytes: r.raw_bytes,
                            tables: r.tables.len(),
                            undecoded: Vec::new(),
                        })
                } else {
                    backups
                        .verify(&args.id, destination)
                        .await
                        .map(|v| VerifyResult {
                            id: v.id,
                            source: v.source,
                            restored: false,
                            stored_bytes: v.stored_bytes,
                            raw_bytes: v.raw_bytes,
                            tables: 0,
                            undecoded: v.undecoded,
                        })
                };
                match result {
                    Ok(r) => Ok(Outcome::done_with(&r)?),
                    // A damaged backup or one that restores differently stays so: no retry.
                    Err(e @ (Error::Damaged { .. } | Error::Mismatch { .. })) => {
                        Ok(Outcome::fail(e.to_string()))
                    }
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
