//! `conveyor backup …`: create, list, show and verify backups of the store and of the
//! application's databases (`[backup]` in the config; docs/backups.md).

use clap::Subcommand;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
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
    /// differs, naming it.
    Verify {
        /// The backup's id (from `backup list`).
        id: String,
        /// A `[backup.destinations.<name>]` (default: `backup.destination`).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Runs `cmd` with the config's backups.
pub async fn run(config: &Config, cmd: BackupCommand) -> anyhow::Result<()> {
    let backups = Backups::new(config.backup.clone(), config.database.url.clone())?;
    match cmd {
        BackupCommand::Create {
            source,
            destination,
            out,
        } => {
            let manifest = backups.create(&source, destination.as_deref()).await?;
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
            destination,
            out,
        } => {
            let verified = backups.verify(&id, destination.as_deref()).await?;
            if out.json {
                return output::json(&verified);
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

fn show(m: &Manifest) {
    outln!("backup     {}", m.id);
    outln!("source     {} ({:?})", m.source, m.source_kind);
    outln!("started    {}", output::time(m.started_at));
    outln!("finished   {}", output::time(m.finished_at));
    outln!("version    {}", m.conveyor_version);
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
