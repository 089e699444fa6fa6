//! `conveyor email suppressions add|list|remove`: the addresses no email is sent to, through
//! `conveyor_admin::Admin` as `/v1/email-suppressions` goes. See docs/email.md.

use clap::Subcommand;
use conveyor_admin::{Actor, Admin};
use conveyor_jobs::email::suppression::{NewSuppression, Reason};

use crate::input::usage;
use crate::output;

/// `email suppressions …`
#[derive(Debug, Subcommand)]
pub enum SuppressionCommand {
    /// Suppress an address (for every list, or one with --list).
    Add {
        /// The address.
        address: String,
        /// Only for messages of this list/topic.
        #[arg(long)]
        list: Option<String>,
        /// Why: manual (default), hard_bounce, unsubscribe or complaint.
        #[arg(long, default_value = "manual")]
        reason: String,
        /// A note.
        #[arg(long)]
        detail: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The suppressed addresses.
    List {
        /// Only addresses starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an address's entry (for every list, or the one for --list).
    Remove {
        /// The address.
        address: String,
        /// The list/topic of the entry.
        #[arg(long)]
        list: Option<String>,
    },
}

/// Runs one `email suppressions` command.
pub async fn run(admin: &Admin, cmd: SuppressionCommand) -> anyhow::Result<()> {
    match cmd {
        SuppressionCommand::Add {
            address,
            list,
            reason,
            detail,
            json,
        } => {
            let reason: Reason = serde_json::from_value(serde_json::Value::String(reason.clone()))
                .map_err(|_| {
                    usage(format!(
                        "--reason `{reason}`: use manual, hard_bounce, unsubscribe or complaint"
                    ))
                })?;
            let s = admin
                .add_email_suppression(
                    &Actor::cli(),
                    NewSuppression {
                        address,
                        list,
                        reason,
                        detail,
                    },
                )
                .await?;
            if json {
                return output::json(&s);
            }
            outln!(
                "{} suppressed{} ({})",
                s.address,
                s.list
                    .as_deref()
                    .map(|l| format!(" for list {l}"))
                    .unwrap_or_default(),
                s.reason.as_str()
            );
            Ok(())
        }
        SuppressionCommand::List {
            prefix,
            limit,
            json,
        } => {
            let all = admin
                .email_suppressions(prefix.as_deref(), None, limit)
                .await?;
            if json {
                return output::json(&all);
            }
            if all.is_empty() {
                outln!("no suppressed addresses");
            }
            for s in &all {
                outln!(
                    "{:<40} {:<16} {:<12} {} {}",
                    s.address,
                    s.list.as_deref().unwrap_or("(every list)"),
                    s.reason.as_str(),
                    output::time(s.created_at),
                    s.detail.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        SuppressionCommand::Remove { address, list } => {
            admin
                .remove_email_suppression(&Actor::cli(), &address, list.as_deref())
                .await?;
            outln!("{address} is no longer suppressed");
            Ok(())
        }
    }
}
