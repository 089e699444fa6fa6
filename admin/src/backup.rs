//! Backups: `/v1/backups` and `conveyor backup …` go through here.
//!
//! The backup work itself (dump, upload, verify, restore, prune) is `conveyor_backup`'s. This
//! layer holds the rules around it that the API and the CLI share:
//! - The names a caller gives (source, destination, backup id) are checked before anything is
//!   enqueued, so a typo is refused at once (unknown names are bad input naming the field, an
//!   unknown backup is not found) instead of failing later in a worker.
//! - Over the API, a backup, a verification and a prune are jobs (`backup.run`,
//!   `backup.verify`, `backup.prune`; [`Admin::enqueue_backup_job`]): they read or write
//!   gigabytes for minutes, longer than an HTTP request should stay open; the worker that runs
//!   them is where `pg_dump`/`pg_restore`, the scratch space and the destination's credentials
//!   are; and the job model already gives them retries, a kept result and an answer to "is it
//!   done?" (`GET /v1/jobs/{id}`). The CLI runs them in the process ([`create`], [`verify`],
//!   [`restore`], [`prune`]), as an operator at a terminal expects.
//! - Every one is audited: `backup.create`, `backup.verify`, `backup.restore`, `backup.prune`
//!   (a dry run changes nothing and is not). An API request is recorded when its job is
//!   queued (the target names the job); a CLI command when it has finished, in the configured
//!   store when it can be opened (a restore is often run while that store is the one lost: the
//!   record is then skipped with a warning, and the restore stands).
//! - The kinds themselves are reserved (`conveyor_jobs::RESERVED_KINDS`): `POST /v1/jobs` and
//!   client schedules cannot start them.

use conveyor_backup::{Backups, Manifest, Pruned, Restored, Verified};
use conveyor_jobs::backup::{PRUNE_KIND, RUN_KIND, VERIFY_KIND};
use conveyor_worker::{NewJob, Store};
use serde_json::{Value, json};

use crate::audit::{self, AuditEntry};
use crate::enqueue::EnqueueOutcome;
use crate::{Actor, Admin, Error, Result};

/// What a backup job does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupJob {
    /// Back up `source` (default `store`) to `destination` (default `backup.destination`).
    Run {
        /// The source.
        source: Option<String>,
        /// The destination.
        destination: Option<String>,
    },
    /// Verify backup `id` (and, with `restore`, restore a scratch copy and compare it).
    Verify {
        /// The backup.
        id: String,
        /// The destination holding it.
        destination: Option<String>,
        /// Also restore a scratch copy.
        restore: bool,
    },
    /// Apply `[backup.retention]` to `destination`.
    Prune {
        /// The destination.
        destination: Option<String>,
        /// Only report what would be deleted.
        dry_run: bool,
    },
}

/// How a backup job is queued.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobOptions {
    /// The queue its job runs on (default `default`); a worker with the `[backup]`
    /// configuration must serve it.
    pub queue: Option<String>,
    /// A second request with this key returns the first one's job.
    pub idempotency_key: Option<String>,
}

fn invalid(field: &str, message: String) -> Error {
    Error::Store(conveyor_worker::Error::invalid(field, message))
}

/// A `conveyor_backup` error about a name the caller gave, as bad input naming `field`.
fn name_error(field: &str, e: conveyor_backup::Error) -> Error {
    match e {
        conveyor_backup::Error::NotFound(message) => invalid(field, message),
        other => Error::Backup(other),
    }
}

/// Checks that `destination` (default: `backup.destination`) is configured and returns its
/// name.
pub fn check_destination(backups: &Backups, destination: Option<&str>) -> Result<String> {
    let name = destination.unwrap_or(&backups.config().destination);
    if !backups.config().destinations().contains_key(name) {
        // The same message `Backups::destination` gives.
        return Err(name_error(
            "destination",
            backups.destination(Some(name)).err().unwrap_or_else(|| {
                conveyor_backup::Error::NotFound(format!("no backup destination `{name}`"))
            }),
        ));
    }
    Ok(name.to_string())
}

/// Checks that `source` (default: `store`) is `store` or a `[backup.sources.<name>]` and
/// returns its name.
pub fn check_source(backups: &Backups, source: Option<&str>) -> Result<String> {
    let name = source.unwrap_or(conveyor_backup::config::STORE_SOURCE);
    if name != conveyor_backup::config::STORE_SOURCE && !backups.config().sources.contains_key(name)
    {
        return Err(name_error(
            "source",
            backups.source(name).err().unwrap_or_else(|| {
                conveyor_backup::Error::NotFound(format!("no backup source `{name}`"))
            }),
        ));
    }
    Ok(name.to_string())
}

/// The complete backups in `destination` (default: `backup.destination`), oldest first;
/// only `source`'s when given (any name: the backups of a source since removed from the
/// config are still listed).
pub async fn list(
    backups: &Backups,
    destination: Option<&str>,
    source: Option<&str>,
) -> Result<Vec<Manifest>> {
    let name = check_destination(backups, destination)?;
    if let Some(source) = source {
        conveyor_worker::job::check_name("source", source)?;
    }
    Ok(backups.destination(Some(&name))?.list(source).await?)
}

/// Backup `id`'s manifest, from `destination` (default: `backup.destination`). Not found
/// when the destination has no complete backup with this id.
pub async fn show(backups: &Backups, id: &str, destination: Option<&str>) -> Result<Manifest> {
    let name = check_destination(backups, destination)?;
    Ok(backups.destination(Some(&name))?.find(id).await?)
}

/// Writes the audit record of an operation that has already happened: a store that refuses
/// it only logs a warning, since the operation stands.
async fn record_done(store: Option<&dyn Store>, entry: AuditEntry) {
    let Some(store) = store else {
        tracing::warn!(
            audit.action = %entry.action,
            "the store cannot be opened: this backup operation is not in the audit log"
        );
        return;
    };
    if let Err(e) = audit::record(store, entry).await {
        tracing::warn!(error = %e, "the backup operation succeeded, but its audit record was not written");
    }
}

/// Backs up `source` (default `store`) to `destination` now, in this process (`conveyor
/// backup create`). Audited as `backup.create` in `audit` when given.
pub async fn create(
    backups: &Backups,
    audit: Option<&dyn Store>,
    actor: &Actor,
    source: Option<&str>,
    destination: Option<&str>,
) -> Result<Manifest> {
    let source = source.unwrap_or(conveyor_backup::config::STORE_SOURCE);
    let destination = backups.destination(destination)?.name().to_string();
    let manifest = backups.create(source, Some(&destination)).await?;
    record_done(
        audit,
        AuditEntry::new(actor.clone(), "backup.create")
            .target(json!({ "source": source, "destination": destination, "backup": manifest.id }))
            .affected(1),
    )
    .await;
    Ok(manifest)
}

/// What a verification found.
#[derive(Clone, Debug)]
pub enum Verification {
    /// Every object's checksums matched.
    Objects(Verified),
    /// ... and a scratch copy restored as recorded.
    Restored(Restored),
}

/// Verifies backup `id` now (`conveyor backup verify [--restore]`). Audited as
/// `backup.verify` when it succeeds.
pub async fn verify(
    backups: &Backups,
    audit: Option<&dyn Store>,
    actor: &Actor,
    id: &str,
    destination: Option<&str>,
    restore: bool,
) -> Result<Verification> {
    let destination = backups.destination(destination)?.name().to_string();
    let done = if restore {
        Verification::Restored(backups.verify_restore(id, Some(&destination)).await?)
    } else {
        Verification::Objects(backups.verify(id, Some(&destination)).await?)
    };
    record_done(
        audit,
        AuditEntry::new(actor.clone(), "backup.verify")
            .target(json!({ "backup": id, "destination": destination, "restore": restore }))
            .affected(1),
    )
    .await;
    Ok(done)
}

/// Restores backup `id` into `target` now (`conveyor backup restore`). Audited as
/// `backup.restore` (the target without its password) in the store `audit` opens once the
/// restore is done: opened before, a SQLite store restored over (`--force`) would be written
/// through a stale connection.
pub async fn restore<F, Fut>(
    backups: &Backups,
    audit: F,
    actor: &Actor,
    id: &str,
    target: &str,
    force: bool,
    destination: Option<&str>,
) -> Result<Restored>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Option<std::sync::Arc<dyn Store>>>,
{
    let destination = backups.destination(destination)?.name().to_string();
    let restored = backups
        .restore(id, target, force, Some(&destination))
        .await?;
    let store = audit().await;
    record_done(
        store.as_deref(),
        AuditEntry::new(actor.clone(), "backup.restore")
            .target(json!({
                "backup": id,
                "destination": destination,
                "target": restored.target,
                "force": force,
            }))
            .affected(1),
    )
    .await;
    Ok(restored)
}

/// Applies `[backup.retention]` to `destination` now (`conveyor backup prune`). Audited as
/// `backup.prune` with the deleted ids, unless `dry_run`.
pub async fn prune(
    backups: &Backups,
    audit: Option<&dyn Store>,
    actor: &Actor,
    destination: Option<&str>,
    dry_run: bool,
) -> Result<Pruned> {
    let pruned = backups.prune(destination, dry_run).await?;
    if !dry_run {
        let deleted: Vec<&str> = pruned.deleted.iter().map(|d| d.id.as_str()).collect();
        record_done(
            audit,
            AuditEntry::new(actor.clone(), "backup.prune")
                .target(json!({ "destination": pruned.destination, "deleted": deleted }))
                .affected(deleted.len() as u64),
        )
        .await;
    }
    Ok(pruned)
}

impl Admin {
    /// Checks `job`'s names (and, for a verification, that the backup exists; for a prune,
    /// that `[backup.retention]` keeps something) and enqueues it as a `backup.*` job on
    /// `options.queue`. Audited as `backup.create`, `backup.verify` or `backup.prune`, the
    /// target naming the job; a request whose idempotency key an earlier one holds returns
    /// that job and is not recorded again.
    pub async fn enqueue_backup_job(
        &self,
        actor: &Actor,
        backups: &Backups,
        job: BackupJob,
        options: JobOptions,
    ) -> Result<EnqueueOutcome> {
        let (kind, action, args) = match &job {
            BackupJob::Run {
                source,
                destination,
            } => {
                let source = check_source(backups, source.as_deref())?;
                let destination = check_destination(backups, destination.as_deref())?;
                (
                    RUN_KIND,
                    "backup.create",
                    json!({ "source": source, "destination": destination }),
                )
            }
            BackupJob::Verify {
                id,
                destination,
                restore,
            } => {
                let destination = check_destination(backups, destination.as_deref())?;
                let manifest = backups.destination(Some(&destination))?.find(id).await?;
                (
                    VERIFY_KIND,
                    "backup.verify",
                    json!({ "id": manifest.id, "destination": destination, "restore": restore }),
                )
            }
            BackupJob::Prune {
                destination,
                dry_run,
            } => {
                let destination = check_destination(backups, destination.as_deref())?;
                backups.config().retention.check()?;
                (
                    PRUNE_KIND,
                    "backup.prune",
                    json!({ "destination": destination, "dry_run": dry_run }),
                )
            }
        };
        let queue = options.queue.unwrap_or_else(|| "default".into());
        let mut new = NewJob::new(kind, args.clone())
            .queue(queue.clone())
            .max_attempts(conveyor_worker::job::DEFAULT_MAX_ATTEMPTS);
        if let Some(key) = options.idempotency_key {
            new = new.idempotency_key(key);
        }
        // Every rule of a client's job but the reserved kind, which is what these routes are
        // for: the queue may not be the webhook queue.
        new.validate()?;
        conveyor_jobs::check_reserved_names("", &queue, &self.webhooks.config().queue)
            .map_err(|e| invalid(e.field, e.message))?;
        let enqueued = self.store.enqueue(new).await?;
        if !enqueued.duplicate {
            let mut target = args;
            if let Value::Object(map) = &mut target {
                map.insert("job".into(), json!(enqueued.id.to_string()));
            }
            self.audit(actor, action, target, 1).await?;
        }
        let warnings = self
            .serving
            .get(self.store.as_ref())
            .await?
            .warnings([(queue.as_str(), kind)]);
        Ok(EnqueueOutcome { enqueued, warnings })
    }
}
