//! `conveyor backup …`: create, list, show, verify and restore backups of the store and of the
//! application's databases (`[backup]` in the config; docs/backups.md).

use clap::Subcommand;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use conveyor_admin::Actor;
use conveyor_admin::backup::{self, Verification};
use conveyor_backup::{Backups, Manifest};

use crate::cli::OutputArgs;
use crate::config::Config;
use crate::output;

/// `backup …`
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a source now (default: the store) and print its manifest.
    Create {
        /// `store` (Conveyor's own) or a `[backup.sources.<name>]`.
        #[arg(long, default_value = conveyor_backup::config::STORE_SOURCE)]
        source: String,
        /// A `[backup.destinations.<name>]` (default: `backup.destination`).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The complete backups in a destination, oldest first.
    List {
        /// Only this source's.
        #[arg(long)]
        source: Option<String>,
        /// A `[backup.destinations.<name>]` (default: `backup.destination`).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// One backup's manifest: objects, sizes, checksums, the source's figures.
    Show {
        /// The backup's id (from `backup list`).
        id: String,
        /// A `[backup.destinations.<name>]` (default: `backup.destination`).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Re-read every object of a backup and check its size and SHA-256; exits 1 if any
    /// differs, naming it. With `--restore`, also restore it into a scratch database or
    /// file and compare rows and checksums per table with the figures recorded at backup
    /// time.
    Verify {
        /// The backup's id (from `backup list`).
        id: String,
        /// Also restore into a scratch copy (dropped afterwards) and compare its tables.
        #[arg(long)]
        restore: bool,
        /// The age identity file that decrypts an encrypted backup (over
        /// `backup.identity_file`).
        #[arg(long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
        /// A `[backup.destinations.<name>]` (default: `backup.destination`).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete the backups `[backup.retention]` does not keep (keep_last, keep_daily,
    /// keep_weekly, keep_monthly, per source); the newest verified backup is always kept.
    Prune {
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// A `[backup.destinations.<name>]` (default: `backup.destination`).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Restore a backup into a fresh store or database: a SQLite file, a postgres:// URL, or
    /// a redis:// URL whose `?prefix=` names where the keys go.
    /// The backup is verified first; the restored copy is checked against its figures. For
    /// the store, jobs that were running at backup time become retryable again.
    Restore {
        /// The backup's id (from `backup list`).
        id: String,
        /// Where to: a SQLite file (`sqlite://PATH` or a path), a `postgres://` URL, or a
        /// `redis://HOST/DB?prefix=NAME`.
        #[arg(long)]
        to: String,
        /// Replace what the target holds (SQLite: the file; Postgres: the backup's schemas;
        /// Redis: the keys under the prefix).
        #[arg(long)]
        force: bool,
        /// The age identity file that decrypts an encrypted backup (over
        /// `backup.identity_file`).
        #[arg(long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
        /// A `[backup.destinations.<name>]` (default: `backup.destination`).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Runs `cmd` with the config's backups.
pub async fn run(config: &Config, cmd: BackupCommand) -> anyhow::Result<()> {
    let mut backups = Backups::new(config.backup.clone(), config.database.url.clone())?;
    if let BackupCommand::Verify {
        identity: Some(path),
        ..
    }
    | BackupCommand::Restore {
        identity: Some(path),
        ..
    } = &cmd
    {
        backups = backups.with_identity(path.clone());
    }
    // The store the metrics' records and the audit records go to (a restore opens it
    // afterwards: see `conveyor_admin::backup::restore`).
    let store = if matches!(
        cmd,
        BackupCommand::Create { .. }
            | BackupCommand::Verify { .. }
            | BackupCommand::Prune { dry_run: false, .. }
    ) {
        status_store(config).await
    } else {
        None
    };
    if let Some(store) = &store {
        backups = backups.with_status(store.clone());
    }
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    backups = backups.with_progress(counter.clone());
    let progress = match &cmd {
        BackupCommand::Create { source, out, .. } => {
            Progress::start(&format!("backing up `{source}`"), out.json, counter)
        }
        BackupCommand::Verify { id, out, .. } => {
            Progress::start(&format!("verifying {id}"), out.json, counter)
        }
        BackupCommand::Restore { id, out, .. } => {
            Progress::start(&format!("restoring {id}"), out.json, counter)
        }
        _ => None,
    };
    perform(config, backups, store, progress, cmd).await
}

/// A live line on stderr while a long operation runs — bytes stored or read back, rate and
/// time — only when stderr is a terminal and the output is not `--json`.
struct Progress {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(
        label: &str,
        json: bool,
        counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Option<Self> {
        if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg}: {bytes} ({binary_bytes_per_sec}), {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(label.to_string());
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                shown.set_position(counter.load(std::sync::atomic::Ordering::Relaxed));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        Some(Self { bar, ticker })
    }
}

/// Cleared when dropped: before the result is printed, or with the error.
impl Drop for Progress {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

async fn perform(
    config: &Config,
    backups: Backups,
    store: Option<std::sync::Arc<dyn conveyor_worker::Store>>,
    mut progress: Option<Progress>,
    cmd: BackupCommand,
) -> anyhow::Result<()> {
    let audit = store.as_deref();
    let actor = Actor::cli();
    match cmd {
        BackupCommand::Create {
            source,
            destination,
            out,
        } => {
            let manifest = backup::create(
                &backups,
                audit,
                &actor,
                Some(&source),
                destination.as_deref(),
            )
            .await
            .map_err(unwrap)?;
            drop(progress.take());
            if out.json {
                return output::json(&manifest);
            }
            outln!(
                "backup {} of `{}` complete: {} read, {} stored, in {:.1}s",
                manifest.id,
                manifest.source,
                bytes(manifest.raw_bytes()),
                bytes(manifest.stored_bytes()),
                (manifest.finished_at - manifest.started_at).num_milliseconds() as f64 / 1000.0
            );
            Ok(())
        }
        BackupCommand::List {
            source,
            destination,
            out,
        } => {
            let dest = backups.destination(destination.as_deref())?;
            let all = dest.list(source.as_deref()).await?;
            if out.json {
                return output::json(&all);
            }
            if all.is_empty() {
                outln!(
                    "no complete backups in `{}` ({})",
                    dest.name(),
                    dest.location()
                );
                return Ok(());
            }
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_header(["id", "source", "finished", "size", "stored"]);
            for m in &all {
                t.add_row(vec![
                    m.id.clone(),
                    m.source.clone(),
                    output::time(m.finished_at),
                    bytes(m.raw_bytes()),
                    bytes(m.stored_bytes()),
                ]);
            }
            outln!("{t}");
            Ok(())
        }
        BackupCommand::Show {
            id,
            destination,
            out,
        } => {
            let manifest = backups
                .destination(destination.as_deref())?
                .find(&id)
                .await?;
            if out.json {
                return output::json(&manifest);
            }
            show(&manifest);
            Ok(())
        }
        BackupCommand::Verify {
            id,
            restore: true,
            destination,
            out,
            ..
        } => {
            let Verification::Restored(checked) =
                backup::verify(&backups, audit, &actor, &id, destination.as_deref(), true)
                    .await
                    .map_err(unwrap)?
            else {
                anyhow::bail!("backup {id} was verified without its restore");
            };
            drop(progress.take());
            if out.json {
                return output::json(&checked);
            }
            outln!(
                "backup {} of `{}` verified and restored into a scratch copy: {} table(s) match the figures recorded at backup time ({} decoded, {:.1}s)",
                checked.id,
                checked.source,
                checked.tables.len(),
                bytes(checked.raw_bytes),
                checked.duration_ms as f64 / 1000.0
            );
            Ok(())
        }
        BackupCommand::Prune {
            dry_run,
            destination,
            out,
        } => {
            let pruned = backup::prune(&backups, audit, &actor, destination.as_deref(), dry_run)
                .await
                .map_err(unwrap)?;
            if out.json {
                return output::json(&pruned);
            }
            let verb = if dry_run { "would delete" } else { "deleted" };
            for d in &pruned.deleted {
                outln!("{verb} {} ({})", d.id, d.source);
            }
            for k in &pruned.kept {
                let reasons: Vec<String> = k
                    .reasons
                    .iter()
                    .map(|r| {
                        serde_json::to_value(r)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    })
                    .collect();
                outln!("kept {} ({}): {}", k.id, k.source, reasons.join(", "));
            }
            outln!(
                "{} backup(s) kept, {} {verb} in `{}`",
                pruned.kept.len(),
                pruned.deleted.len(),
                pruned.destination
            );
            Ok(())
        }
        BackupCommand::Restore {
            id,
            to,
            force,
            destination,
            out,
            ..
        } => {
            let restored = backup::restore(
                &backups,
                || status_store(config),
                &actor,
                &id,
                &to,
                force,
                destination.as_deref(),
            )
            .await
            .map_err(unwrap)?;
            drop(progress.take());
            if out.json {
                return output::json(&restored);
            }
            outln!(
                "backup {} of `{}` restored into {}: {} table(s) match the figures recorded at backup time ({} decoded, {:.1}s)",
                restored.id,
                restored.source,
                restored.target,
                restored.tables.len(),
                bytes(restored.raw_bytes),
                restored.duration_ms as f64 / 1000.0
            );
            if let Some(jobs) = &restored.jobs {
                outln!(
                    "jobs running at backup time: {} available again, {} dead (last attempt), {} cancelled (cancel requested), {} still leased (retried once their lease expires)",
                    jobs.retried,
                    jobs.dead,
                    jobs.cancelled,
                    jobs.still_leased
                );
            }
            Ok(())
        }
        BackupCommand::Verify {
            id,
            restore: false,
            destination,
            out,
            ..
        } => {
            let Verification::Objects(verified) =
                backup::verify(&backups, audit, &actor, &id, destination.as_deref(), false)
                    .await
                    .map_err(unwrap)?
            else {
                anyhow::bail!("backup {id} was restored while only its objects were asked for");
            };
            drop(progress.take());
            if out.json {
                return output::json(&verified);
            }
            if !verified.undecoded.is_empty() {
                outln!(
                    "backup {} of `{}`: the stored bytes of {} object(s) ({}) match the manifest, but {} could not be decoded: it is encrypted and no identity is configured (set backup.identity_file or pass --identity FILE to check its content); not recorded as verified",
                    verified.id,
                    verified.source,
                    verified.objects,
                    bytes(verified.stored_bytes),
                    verified.undecoded.join(", ")
                );
                return Ok(());
            }
            outln!(
                "backup {} of `{}` verified: {} object(s), {} stored, {} decoded, every checksum matches",
                verified.id,
                verified.source,
                verified.objects,
                bytes(verified.stored_bytes),
                bytes(verified.raw_bytes)
            );
            Ok(())
        }
    }
}

/// A backup operation's error as the backup crate gave it (so the exit status follows its
/// kind), or the admin layer's.
fn unwrap(e: conveyor_admin::Error) -> anyhow::Error {
    match e {
        conveyor_admin::Error::Backup(e) => e.into(),
        other => other.into(),
    }
}

/// The store the backup metrics' records are written to, when it can be opened: never
/// created for this (a SQLite store whose file is missing is skipped), and a store that
/// cannot be reached only skips the record, with a warning.
async fn status_store(config: &Config) -> Option<std::sync::Arc<dyn conveyor_worker::Store>> {
    if let Ok(conveyor_backup::source::Source::Sqlite { path, .. }) =
        conveyor_backup::source::Source::store(&config.database.url)
        && !path.is_file()
    {
        return None;
    }
    match crate::app::open_store(config).await {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the backup metrics' record is not written");
            None
        }
    }
}

fn show(m: &Manifest) {
    outln!("backup     {}", m.id);
    outln!("source     {} ({:?})", m.source, m.source_kind);
    outln!("started    {}", output::time(m.started_at));
    outln!("finished   {}", output::time(m.finished_at));
    outln!("version    {}", m.conveyor_version);
    if let Some(e) = &m.encryption {
        outln!("encryption {} to {} recipient(s)", e.scheme, e.recipients);
    }
    for o in &m.objects {
        outln!(
            "object     {}: {} stored (sha256 {}), {} raw (sha256 {})",
            o.name,
            bytes(o.stored_bytes),
            o.stored_sha256,
            bytes(o.raw_bytes),
            o.raw_sha256
        );
    }
    for t in &m.tables {
        outln!("table      {}: {} rows", t.table, t.rows);
    }
}

/// `1.5 MB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
