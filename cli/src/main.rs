//! The `conveyor` binary. See `conveyor --help`, and the README for a tour.

mod bench;
mod cli;
mod commands;
mod config;
mod output;
mod schedules;
mod serve;
mod webhooks;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use conveyor_worker::Store;
use conveyor_worker::store::{self, StoreOptions};
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, Role};
use crate::config::{Config, ConfigError, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // The benchmark takes its store from --url alone and ignores the config file.
    if let Command::Bench(args) = cli.command {
        init_logging(cli.log_level.as_deref().unwrap_or("warn"), LogFormat::Text);
        return bench::run(args).await;
    }

    let mut config = config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(url) = cli.database_url {
        config.database.url = url;
        config.validate()?;
    }
    let long_running = matches!(cli.command, Command::Serve(_) | Command::Worker(_));
    let level = match (&cli.log_level, long_running) {
        (Some(level), _) => level.clone(),
        (None, true) => config.log.level.clone(),
        (None, false) => "warn".into(),
    };
    init_logging(&level, config.log.format);

    match cli.command {
        Command::Serve(args) => {
            if let Some(roles) = args.roles {
                config.serve.roles = roles;
            }
            if let Some(listen) = args.listen {
                config.serve.listen = listen;
            }
            if let Some(queues) = &args.queues {
                config.set_queues(queues)?;
            }
            config.validate()?;
            let store = open_store(&config).await?;
            serve::run(config, store).await
        }
        Command::Worker(args) => {
            config.serve.roles = vec![Role::Worker, Role::Scheduler];
            if let Some(queues) = &args.queues {
                config.set_queues(queues)?;
            }
            let store = open_store(&config).await?;
            serve::run(config, store).await
        }
        Command::Migrate => {
            let store = open_store(&config).await?;
            println!(
                "migrations applied: {} at {}",
                store.backend_name().await?,
                store::redact_url(&config.database.url)
            );
            Ok(())
        }
        Command::Enqueue(args) => commands::enqueue(open_store(&config).await?, args).await,
        Command::Jobs(cmd) => commands::jobs(open_store(&config).await?, cmd).await,
        Command::Dead(cmd) => commands::dead(open_store(&config).await?, cmd).await,
        Command::Queues(out) => commands::queues(open_store(&config).await?, out.json).await,
        Command::Schedules(cmd) if schedules::from_config_only(&config, &cmd) => {
            schedules::next_from_config(&config, cmd)
        }
        Command::Schedules(cmd) => {
            config.compiled_schedules()?;
            schedules::run(&config, open_store(&config).await?, cmd).await
        }
        Command::Keys(cmd) => commands::keys(open_store(&config).await?, cmd).await,
        Command::Audit(cmd) => commands::audit(open_store(&config).await?, cmd).await,
        Command::Webhooks(cmd) => {
            webhooks::run(open_store(&config).await?, config.webhooks.clone(), cmd).await
        }
        Command::Bench(_) => unreachable!("handled above"),
    }
}

/// Opens (and migrates) the configured store, with an error that says how to fix it.
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = &config.database.url;
    let mut options = StoreOptions {
        max_connections: config.database.max_connections,
        ..StoreOptions::default()
    };
    options.pg_session = Some(config.database.pg_session());
    store::connect(url, options)
    .await
    .with_context(|| {
        format!(
            "cannot open the store at {}: check that the database is running and reachable, and set database.url, CONVEYOR_DATABASE__URL or --database-url",
            store::redact_url(url)
        )
    })
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
