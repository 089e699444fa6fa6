//! The command line: every subcommand and flag of `conveyor`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bench::BenchArgs;

/// Conveyor: background jobs, cron schedules and notifications in one binary.
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML). Default: ./conveyor.toml if it exists.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store URL; overrides `database.url` (sqlite://conveyor.db, postgres://user@host/db,
    /// redis://host:6379/0).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Log filter, e.g. `info` or `conveyor=debug,sqlx=warn`; overrides `log.level` and RUST_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the platform: HTTP endpoints, workers and maintenance in one process.
    Serve(ServeArgs),
    /// Run workers and maintenance only (no HTTP listener): `serve --roles worker,scheduler`.
    Worker(WorkerArgs),
    /// Apply the store's migrations and exit.
    Migrate(OutputArgs),
    /// Enqueue one job.
    Enqueue(EnqueueArgs),
    /// Inspect and operate on jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// The dead-letter queue: jobs whose attempts ran out or that failed permanently.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Counts by state and the oldest ready job's age, per queue; pause and resume a queue.
    Queues(QueuesArgs),
    /// Cron schedules: list, show, create, update, delete, pause, resume, trigger, next.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// API keys: create (shown once), list, revoke.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit log of operator actions.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Run the shared benchmark protocol against a store.
    Bench(BenchArgs),
    /// Check a running Conveyor's probe (exit 0 on a 2xx answer): a container healthcheck
    /// without curl, e.g. `conveyor health --url http://127.0.0.1:9090/livez`.
    Health(HealthArgs),
    /// Webhooks: endpoints, events, the attempt log, replay, health.
    #[command(subcommand)]
    Webhooks(crate::webhooks::WebhooksCommand),
    /// Email: send a message through the configured SMTP transports, show one.
    #[command(subcommand)]
    Email(crate::emails::EmailCommand),
    /// The keys that encrypt credentials kept in the store: generate-key, status, reencrypt.
    #[command(subcommand)]
    Secrets(crate::secrets::SecretsCommand),
    /// Backups of the store and the application's databases: create, list, show, verify.
    #[command(subcommand)]
    Backup(crate::backups::BackupCommand),
    /// The platform history: throughput, failures, run-time and wait percentiles per queue
    /// and kind over a period, with sparklines (kept after finished jobs are pruned).
    Stats(crate::stats::StatsArgs),
    /// The application's rollups (`[analytics.rollups.NAME]`): backfill a period, status.
    #[command(subcommand)]
    Analytics(crate::analytics::AnalyticsCommand),
}

/// `keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once (only its hash is stored).
    Create {
        /// What it may do: enqueue, read, operate (read + actions), admin (everything) or
        /// worker (a remote worker: claim jobs and report their outcomes).
        #[arg(long)]
        scope: String,
        /// Who or what it is for, e.g. billing-app.
        #[arg(long)]
        name: String,
        /// A worker key may claim from this queue only (repeat for more; none: any queue).
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Every key (id, name, scope, created, revoked).
    List(OutputArgs),
    /// Revoke a key by id (or the whole key); requests with it get 401.
    Revoke {
        /// The key's id (the part after `cvk_`), or the key itself.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Operator actions, newest first.
    List {
        /// Page size (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this audit id (the last id of the previous page).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// A role of a `serve` process.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The HTTP listener (`/livez`, `/readyz`, and the API as it grows).
    Api,
    /// Fetch and run jobs.
    Worker,
    /// Maintenance: promote due jobs, rescue expired leases, prune old jobs.
    Scheduler,
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Roles to run (default: all of api, worker, scheduler).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub roles: Option<Vec<Role>>,
    /// HTTP listen address (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Queues and their concurrency, e.g. `default=10,emails=4`.
    #[arg(long, value_delimiter = ',', value_name = "QUEUE=N")]
    pub queues: Option<Vec<String>>,
}

/// Flags of `worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues and their concurrency, e.g. `default=10,emails=4`.
    #[arg(long, value_delimiter = ',', value_name = "QUEUE=N")]
    pub queues: Option<Vec<String>>,
}

/// `queues [pause NAME | resume NAME]`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QueuesArgs {
    /// Without one: every queue's counts.
    #[command(subcommand)]
    pub action: Option<QueuesAction>,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `queues pause|resume`.
#[derive(Debug, Subcommand)]
pub enum QueuesAction {
    /// Stop workers fetching from a queue (within a second); it keeps accepting jobs, and
    /// running jobs finish. Audited as `queue.pause`.
    Pause {
        /// The queue's name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Let workers fetch from a paused queue again. Audited as `queue.resume`.
    Resume {
        /// The queue's name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Flags of `health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The URL to GET.
    #[arg(long, default_value = "http://127.0.0.1:8080/livez")]
    pub url: String,
    /// Give up after this long (e.g. 3s).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// `--json` alone.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The job kind (selects the handler), e.g. demo.echo.
    #[arg(long)]
    pub kind: String,
    /// Queue to put it on.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Handler arguments as JSON, or `@file.json` to read them from a file (`@-`: stdin).
    #[arg(long, default_value = "{}", value_name = "JSON")]
    pub args: String,
    /// Smaller runs first.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i16,
    /// Attempts before the job goes dead.
    #[arg(long, default_value_t = conveyor_worker::job::DEFAULT_MAX_ATTEMPTS)]
    pub max_attempts: i32,
    /// Run no earlier than this instant (RFC 3339, e.g. 2026-12-01T09:00:00Z).
    #[arg(long, conflicts_with = "delay", value_name = "TIME")]
    pub run_at: Option<String>,
    /// Run after this long (e.g. 30s, 5m, 2h).
    #[arg(long, value_name = "DURATION")]
    pub delay: Option<String>,
    /// Deduplicate: a second enqueue with this key returns the first job.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// A label (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Application metadata as a JSON object (or `@file.json`, `@-`).
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Filters shared by the listing and bulk commands.
#[derive(Debug, Args, Default)]
pub struct FilterArgs {
    /// Only this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only jobs with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Created at or after (RFC 3339, or an age such as 2h meaning "2 hours ago").
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Created before (RFC 3339, or an age such as 30m).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Some attempt's error contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
}

/// Paging flags.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Page size (1-1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Continue after this job id (the last id of the previous page).
    #[arg(long, value_name = "ID")]
    pub before: Option<String>,
}

/// `jobs …`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only these states (comma-separated): scheduled, available, running, retryable,
        /// completed, cancelled, dead.
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show one job with its attempt history.
    Show {
        /// Job id.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Make jobs available again with a fresh attempt budget (history kept).
    Retry {
        /// Job ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Cancel waiting jobs, or ask the workers running them to stop.
    Cancel {
        /// Job ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete jobs that are not running.
    Discard {
        /// Job ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `schedules …`
#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// Every schedule with its last fire, last outcome and next fire.
    List(OutputArgs),
    /// One schedule in full, with its last fire, last outcome and next fire.
    Show {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Store a new schedule (it starts firing within a second on every scheduler).
    Create {
        /// Unique name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        fields: ScheduleFields,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Change fields of a stored schedule; fields not given stay as they are.
    Update {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        fields: ScheduleFields,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a schedule (the jobs it enqueued stay).
    Delete {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Stop firing until resumed (ticks while paused are not fired later).
    Pause {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Fire again from the next tick.
    Resume {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Enqueue one job of the schedule now, outside its ticks.
    Trigger {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The next fire times of one schedule, in its time zone.
    Next {
        /// The schedule's name.
        name: String,
        /// How many fire times.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
        count: u16,
        /// Start from this instant (RFC 3339, e.g. 2027-03-27T00:00:00Z) instead of now.
        #[arg(long)]
        after: Option<chrono::DateTime<chrono::FixedOffset>>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// The fields of a schedule, for `create` (where `--cron` and `--kind` are required) and
/// `update` (where every field is optional).
#[derive(Debug, Args)]
pub struct ScheduleFields {
    /// Cron expression: 5 fields (`30 2 * * *`), or 6-7 with seconds first.
    #[arg(long)]
    pub cron: Option<String>,
    /// Job kind to enqueue.
    #[arg(long)]
    pub kind: Option<String>,
    /// IANA time zone the expression is read in (default UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// Queue of the jobs (default `default`).
    #[arg(long)]
    pub queue: Option<String>,
    /// Job arguments as JSON (default `{}`), or `@file.json` (`@-`: stdin).
    #[arg(long)]
    pub args: Option<String>,
    /// Job priority (smaller runs first).
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i16>,
    /// Attempt budget of each job.
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// Missed ticks: skip, latest (default) or all.
    #[arg(long)]
    pub missed: Option<String>,
    /// Most ticks one backfill enqueues with `--missed all`.
    #[arg(long)]
    pub backfill_limit: Option<u32>,
    /// Overlap: allow (default) or skip while the previous tick's job is unfinished.
    #[arg(long)]
    pub overlap: Option<String>,
    /// Store it paused.
    #[arg(long)]
    pub disabled: bool,
}

/// `dead …`
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead jobs, newest first, with their last error.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Retry dead jobs: the ids given, or every dead job matching the filters.
    Retry {
        /// Job ids; without ids, the filters select (use --all to retry every dead job).
        ids: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Select every dead job when no filter is given.
        #[arg(long)]
        all: bool,
        /// Only count what would be retried.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete dead jobs matching the filters.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Select every dead job when no filter is given.
        #[arg(long)]
        all: bool,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
}
