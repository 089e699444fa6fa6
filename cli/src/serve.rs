//! `conveyor serve` / `conveyor worker`: one process running any of the roles.
//!
//! - `api`: the HTTP listener: the `/v1` API (`conveyor_api`), `/livez`, `/readyz`, `/metrics`.
//! - `worker`: the worker runtime over the configured queues.
//! - `scheduler`: promoter, rescuer, pruner and the cron schedules (safe on every replica).
//!
//! With `api.metrics.listen` set, every role (not only `api`) also serves `/metrics` without a
//! key, `/livez` and `/readyz` on that address: the scrape and the probes of a worker or
//! scheduler process.
//!
//! SIGINT or SIGTERM starts a graceful shutdown (drain): workers stop fetching and let
//! running jobs finish within `worker.shutdown_grace`, unfinished jobs go back to the queue,
//! the maintenance services stop. Meanwhile the HTTP listener keeps serving, with `/readyz`
//! answering `503 not ready: shutting down` so a load balancer sends new traffic elsewhere;
//! once every other role has stopped, the listener finishes its open requests and closes,
//! and the process exits 0.

use std::sync::Arc;

use anyhow::Context;
use conveyor_scheduler::{CronScheduler, Maintenance, Schedules};
use conveyor_worker::runtime::Worker;
use conveyor_worker::{Registry, Store};
use tokio_util::sync::CancellationToken;

use crate::cli::Role;
use crate::config::Config;

/// Runs the configured roles until a shutdown signal.
/// `keys` seal webhook signing secrets; secrets still in clear (a store from before they were
/// sealed) are sealed before anything else starts. `kinds`: the kinds the worker runs (the
/// built-in ones and the application's; `webhook.deliver` is added here), whose args the
/// API checks at enqueue.
pub async fn run(
    config: Config,
    store: Arc<dyn Store>,
    keys: conveyor_worker::keyring::Keyring,
    kinds: Arc<Registry>,
) -> anyhow::Result<()> {
    let roles = &config.serve.roles;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    // Fired once the roles below have stopped after `shutdown`: only then do the listeners close.
    let roles_stopped = CancellationToken::new();

    // The listeners, and the roles (worker, scheduler) they outlive on shutdown.
    let mut listeners = tokio::task::JoinSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    // One webhook service per process: the API sends events through it, the worker delivers.
    // `http.request`: run by the worker, its args checked by the API at enqueue.
    let http = crate::http_targets::service(&config, store.clone(), &keys)?;
    // `email.send`: the transports (with their connection pools), run by the worker.
    let emails = crate::emails::service(&config, store.clone(), &keys)?;
    // The args checks of enqueues through this process's API: the targets' and the email
    // rules, and the registered kinds' args types.
    let validators = crate::emails::validators(&http, &emails, &kinds);
    let webhooks = Arc::new(
        conveyor_jobs::webhook::Webhooks::new(store.clone(), config.webhooks.clone())?
            .with_keyring(keys),
    );
    let report = webhooks
        .seal_secrets(conveyor_jobs::webhook::endpoint::SealPass::Plaintext)
        .await
        .context("cannot start with the configured secrets keys")?;
    if report.sealed > 0 {
        tracing::info!(
            secrets = report.sealed,
            "webhook signing secrets stored in clear are now encrypted"
        );
    }
    // The API's state: for the API listener, and for the metrics and probe listener that
    // every role serves when `api.metrics.listen` is set.
    let backups = std::sync::Arc::new(conveyor_backup::Backups::new(
        config.backup.clone(),
        config.database.url.clone(),
    )?);
    let state = (roles.contains(&Role::Api) || config.api.metrics.listen.is_some()).then(|| {
        conveyor_api::AppState::new(store.clone(), config.api.clone())
            .with_webhooks(webhooks.clone())
            .with_validators(validators.clone())
            .with_max_result_bytes(config.worker.max_result_bytes)
            .with_stats(config.stats.clone())
            .with_backups(backups.clone())
            .with_draining(shutdown.clone())
    });
    if let Some(state) = state.as_ref().filter(|_| roles.contains(&Role::Api)) {
        let listener = tokio::net::TcpListener::bind(config.serve.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}: is another process using it? Pick another with --listen or serve.listen",
                    config.serve.listen
                )
            })?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "listening on http://{addr}");
        let app = conveyor_api::router(state.clone());
        let stop = roles_stopped.clone();
        listeners.spawn(async move {
            conveyor_api::serve(listener, app, async move { stop.cancelled().await })
                .await
                .context("HTTP server failed")
        });
    }
    if let (Some(addr), Some(state)) = (config.api.metrics.listen, state) {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for metrics: pick another with api.metrics.listen")
        })?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "metrics, /livez and /readyz on http://{addr}");
        let app = conveyor_api::metrics_router(state);
        let stop = roles_stopped.clone();
        listeners.spawn(async move {
            conveyor_api::serve(listener, app, async move { stop.cancelled().await })
                .await
                .context("metrics server failed")
        });
    }
    if roles.contains(&Role::Scheduler) {
        let maintenance = Maintenance::new(store.clone(), config.maintenance.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            maintenance.run(stop).await;
            Ok(())
        });
        config.compiled_schedules()?;
        let registry = Schedules::new(store.clone());
        let seeded = registry
            .seed_builtin(&conveyor_scheduler::registry::builtin())
            .await
            .context("cannot store the built-in example schedules")?;
        if !seeded.is_empty() {
            tracing::info!(schedules = ?seeded, "example schedules stored (disabled; `conveyor schedules resume NAME` turns one on)");
        }
        let mut schedules = config.schedules.clone();
        if config.stats.enabled {
            schedules.push(crate::stats::schedule(&config.stats));
        }
        schedules.extend(crate::analytics::schedules(&config.analytics));
        let report = registry
            .reconcile(&schedules)
            .await
            .context("cannot store the config file's schedules")?;
        tracing::info!(
            created = ?report.created,
            updated = ?report.updated,
            disabled = ?report.disabled,
            "config schedules reconciled"
        );
        let cron = CronScheduler::from_store(store.clone(), config.maintenance.cron.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            cron.run(stop).await;
            Ok(())
        });
    }
    if roles.contains(&Role::Worker) {
        let mut registry = Registry::clone(&kinds);
        conveyor_jobs::http_target::register(&mut registry, http.clone());
        conveyor_jobs::email::register(&mut registry, emails.clone());
        conveyor_jobs::backup::register(
            &mut registry,
            std::sync::Arc::new(
                conveyor_backup::Backups::new(config.backup.clone(), config.database.url.clone())?
                    .with_status(store.clone()),
            ),
        );
        let mut worker_config = config.worker.clone();
        crate::webhooks::register(&mut registry, &mut worker_config, webhooks.clone());
        if config.stats.enabled {
            crate::stats::register(
                &mut registry,
                &mut worker_config,
                store.clone(),
                &config.stats,
            );
        }
        crate::analytics::register(
            &mut registry,
            &mut worker_config,
            crate::analytics::service(&config, store.clone())?,
        );
        let worker = Worker::new(store.clone(), registry, worker_config)?;
        let stop = shutdown.clone();
        tasks.spawn(async move { worker.run(stop).await.context("worker failed") });
    }
    tracing::info!(
        roles = ?roles,
        store = %conveyor_worker::store::redact_url(&config.database.url),
        "conveyor started; Ctrl-C to stop"
    );

    let mut result = Ok(());
    loop {
        if tasks.is_empty() && shutdown.is_cancelled() && !roles_stopped.is_cancelled() {
            tracing::info!("roles stopped; closing the HTTP listener");
            roles_stopped.cancel();
        }
        let joined = tokio::select! {
            Some(joined) = tasks.join_next() => joined,
            Some(joined) = listeners.join_next() => joined,
            // Without roles (`--roles api`), the listener closes as soon as shutdown starts.
            _ = shutdown.cancelled(), if tasks.is_empty() && !roles_stopped.is_cancelled() => continue,
            else => break,
        };
        let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %format!("{e:#}"), "a role failed; shutting down");
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    if result.is_ok() {
        tracing::info!("shut down cleanly");
    }
    result
}

/// Fires `shutdown` on SIGINT or SIGTERM.
async fn signal_shutdown(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested: finishing running jobs");
    shutdown.cancel();
}
