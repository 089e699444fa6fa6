//! The `conveyor` binary. See `conveyor --help`, and the README for a tour.

#[macro_use]
mod console;

mod bench;
mod cli;
mod commands;
mod config;
mod http_targets;
mod input;
mod output;
mod schedules;
mod secrets;
mod serve;
mod webhooks;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use conveyor_jobs::webhook::endpoint::SealPass;
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
            errln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("error: {}", report(&e));
            ExitCode::from(exit_status(&e))
        }
    }
}

/// The error and its causes on one line, each said once: many errors repeat their source's
/// text in their own (`database error: connection refused` over `connection refused`), so a
/// cause whose text the error before it already ends with is not said again.
fn report(e: &anyhow::Error) -> String {
    let texts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let mut parts: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < texts.len() {
        let text = texts[i].as_str();
        // Causes this text already says in full, in its middle, are not said again.
        let mut next = i + 1;
        while texts.get(next).is_some_and(|c| {
            !c.is_empty() && text.contains(c.as_str()) && !text.ends_with(c.as_str())
        }) {
            next += 1;
        }
        // A cause it ends with is said in its own turn.
        let own = match texts.get(next) {
            Some(cause) if !cause.is_empty() && text.ends_with(cause.as_str()) => text
                [..text.len() - cause.len()]
                .trim_end()
                .trim_end_matches(':')
                .trim_end(),
            _ => text,
        };
        if !own.is_empty() && parts.last() != Some(&own) {
            parts.push(own);
        }
        i = next;
    }
    parts.join(": ")
}

/// 2 for a usage, validation or config error (the input is wrong: fix it and run again, as
/// for clap's own errors), or a request for what only the platform may create (a reserved
/// kind, queue or event type); 1 when the operation itself failed.
fn exit_status(e: &anyhow::Error) -> u8 {
    use conveyor_jobs::webhook::WebhookError;
    // Wrong configured secrets keys: fix the config and run again.
    let webhook_input = |e: &WebhookError| {
        matches!(e, WebhookError::Invalid { .. } | WebhookError::Reserved(_)) || e.is_key_config()
    };
    let bad_input = e.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause.is::<input::UsageError>()
            || cause.is::<conveyor_scheduler::schedule::ScheduleError>()
            || cause.is::<conveyor_jobs::Reserved>()
            || cause
                .downcast_ref::<conveyor_admin::Error>()
                .is_some_and(|e| match e {
                    conveyor_admin::Error::Webhook(w) => webhook_input(w),
                    other => other.is_bad_input(),
                })
            || matches!(
                cause.downcast_ref::<conveyor_worker::Error>(),
                Some(
                    conveyor_worker::Error::InvalidInput { .. }
                        | conveyor_worker::Error::BadUrl { .. }
                )
            )
            || cause
                .downcast_ref::<WebhookError>()
                .is_some_and(webhook_input)
    });
    if bad_input { 2 } else { 1 }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // The benchmark takes its store from --url alone and ignores the config file.
    if let Command::Bench(args) = cli.command {
        init_logging(cli.log_level.as_deref(), "warn", LogFormat::Text);
        return bench::run(args).await;
    }

    let mut config = config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(url) = cli.database_url {
        config.database.url = url;
        config.validate()?;
    }
    let long_running = matches!(cli.command, Command::Serve(_) | Command::Worker(_));
    let fallback = if long_running {
        config.log.level.as_str()
    } else {
        "warn"
    };
    init_logging(cli.log_level.as_deref(), fallback, config.log.format);

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
            let keys = secrets::keyring(&config, true)?;
            serve::run(config, store, keys).await
        }
        Command::Worker(args) => {
            config.serve.roles = vec![Role::Worker, Role::Scheduler];
            if let Some(queues) = &args.queues {
                config.set_queues(queues)?;
            }
            let store = open_store(&config).await?;
            let keys = secrets::keyring(&config, true)?;
            serve::run(config, store, keys).await
        }
        Command::Migrate(out) => {
            let store = open_store(&config).await?;
            let backend = store.backend_name().await?;
            let url = store::redact_url(&config.database.url);
            let sealed = webhooks(&config, store, true)?
                .seal_secrets(SealPass::Plaintext)
                .await?
                .sealed;
            if out.json {
                return output::json(&serde_json::json!({
                    "migrated": true,
                    "backend": backend,
                    "url": url,
                    "secrets_encrypted": sealed,
                }));
            }
            outln!("migrations applied: {backend} at {url}");
            if sealed > 0 {
                outln!("webhook signing secrets stored in clear, now encrypted: {sealed}");
            }
            Ok(())
        }
        Command::Enqueue(args) => commands::enqueue(&open_admin(&config).await?, args).await,
        Command::Jobs(cmd) => commands::jobs(&open_admin(&config).await?, cmd).await,
        Command::Dead(cmd) => commands::dead(&open_admin(&config).await?, cmd).await,
        Command::Queues(args) => commands::queues(&open_admin(&config).await?, args).await,
        Command::Schedules(cmd) if schedules::from_config_only(&config, &cmd) => {
            schedules::next_from_config(&config, cmd)
        }
        Command::Schedules(cmd) => {
            config.compiled_schedules()?;
            schedules::run(&config, &open_admin(&config).await?, cmd).await
        }
        Command::Keys(cmd) => commands::keys(&open_admin(&config).await?, cmd).await,
        Command::Audit(cmd) => commands::audit(open_store(&config).await?, cmd).await,
        Command::Webhooks(cmd) => webhooks::run(&open_admin_with(&config, true).await?, cmd).await,
        Command::Secrets(cmd @ secrets::SecretsCommand::GenerateKey(_)) => {
            secrets::run(None, cmd).await
        }
        Command::Secrets(cmd) => {
            let hooks = webhooks(&config, open_store(&config).await?, false)?;
            secrets::run(Some(hooks), cmd).await
        }
        Command::Bench(_) => unreachable!("handled above"),
    }
}

/// The operator operations over the configured store, with the config's webhook settings,
/// secrets keys and `api.*` limits: the same rules the API applies.
async fn open_admin(config: &Config) -> anyhow::Result<conveyor_admin::Admin> {
    open_admin_with(config, false).await
}

/// [`open_admin`]; `create_key`: make a SQLite store's key file if it has none (for the
/// commands that write secrets).
async fn open_admin_with(
    config: &Config,
    create_key: bool,
) -> anyhow::Result<conveyor_admin::Admin> {
    let store = open_store(config).await?;
    let hooks = webhooks(config, store.clone(), create_key)?;
    let http = http_targets::service(config, store, &secrets::keyring(config, false)?)?;
    Ok(
        conveyor_admin::Admin::new(Arc::new(hooks), config.api.limits())
            .with_validators(http_targets::validators(&http)),
    )
}

/// The webhook service over `store` with the configured keys (`create`: make a SQLite
/// store's key file if it has none).
fn webhooks(
    config: &Config,
    store: Arc<dyn Store>,
    create: bool,
) -> anyhow::Result<conveyor_jobs::webhook::Webhooks> {
    let keys = secrets::keyring(config, create)?;
    Ok(conveyor_jobs::webhook::Webhooks::new(store, config.webhooks.clone())?.with_keyring(keys))
}

/// Opens (and migrates) the configured store, with an error that says how to fix it.
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = &config.database.url;
    let options = StoreOptions {
        max_connections: config.database.max_connections,
        pooler: config.database.pooler,
        listen_url: config.database.listen_url.clone(),
        pg_session: Some(config.database.pg_session()),
    };
    store::connect(url, options).await.map_err(|e| {
        // The hint helps when the store cannot be reached; a store that answered (its disk is
        // full, a migration failed) says what is wrong itself.
        let hint = if e.is_unreachable() {
            ". Check that the database is running and reachable, and set database.url, \
             CONVEYOR_DATABASE__URL or --database-url"
        } else {
            ""
        };
        let text = format!(
            "cannot open the store at {}: {e}{hint}",
            store::redact_url(url)
        );
        anyhow::Error::new(e).context(text)
    })
}

/// The log filter, first found wins: `--log-level`, then `RUST_LOG`, then `fallback` (the
/// config's `log.level` for `serve`/`worker`, `warn` for short commands).
fn log_filter(flag: Option<&str>, rust_log: Option<&str>, fallback: &str) -> EnvFilter {
    [
        flag,
        rust_log.filter(|s| !s.trim().is_empty()),
        Some(fallback),
    ]
    .into_iter()
    .flatten()
    .find_map(|f| EnvFilter::try_new(f).ok())
    .unwrap_or_else(|| EnvFilter::new("info"))
}

fn init_logging(flag: Option<&str>, fallback: &str, format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(flag, rust_log.as_deref(), fallback);
    // Logging never takes the process down: a log reader that goes away (a shipper
    // restarting, `2>&1 | head`) costs the lines written meanwhile, nothing else.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(console::LogWriter)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn log_level_flag_beats_rust_log_which_beats_config() {
        assert_eq!(
            log_filter(Some("debug"), Some("error"), "info").to_string(),
            "debug"
        );
        assert_eq!(log_filter(None, Some("error"), "info").to_string(), "error");
        assert_eq!(log_filter(None, Some(" "), "info").to_string(), "info");
        assert_eq!(log_filter(None, None, "warn").to_string(), "warn");
    }
}
