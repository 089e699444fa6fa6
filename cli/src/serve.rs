//! `conveyor serve` / `conveyor worker`: one process running any of the roles.
//!
//! - `api`: the HTTP listener. Today `/livez` and `/readyz`; the `/v1` API mounts here.
//! - `worker`: the worker runtime over the configured queues.
//! - `scheduler`: promoter, rescuer, pruner and the cron schedules (safe on every replica).
//!
//! SIGINT or SIGTERM starts a graceful shutdown: the listener stops accepting, workers stop
//! fetching and let running jobs finish within `worker.shutdown_grace`, unfinished jobs go
//! back to the queue, and the process exits 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use conveyor_scheduler::{CronScheduler, Maintenance, Schedules};
use conveyor_worker::runtime::Worker;
use conveyor_worker::{Registry, Store};
use tokio_util::sync::CancellationToken;

use crate::cli::Role;
use crate::config::Config;

/// Runs the configured roles until a shutdown signal.
pub async fn run(config: Config, store: Arc<dyn Store>) -> anyhow::Result<()> {
    let roles = &config.serve.roles;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));

    let mut tasks = tokio::task::JoinSet::new();
    if roles.contains(&Role::Api) {
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
        let app = router(store.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .context("HTTP server failed")
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
        let report = registry
            .reconcile(&config.schedules)
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
        let mut registry = Registry::new();
        conveyor_jobs::register_builtin(&mut registry);
        let worker = Worker::new(store.clone(), registry, config.worker.clone())?;
        let stop = shutdown.clone();
        tasks.spawn(async move { worker.run(stop).await.context("worker failed") });
    }
    tracing::info!(
        roles = ?roles,
        store = %conveyor_worker::store::redact_url(&config.database.url),
        "conveyor started; Ctrl-C to stop"
    );

    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
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

/// The HTTP routes.
pub fn router(store: Arc<dyn Store>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(store)
}

/// 200 when the store answers and its schema is current; 503 with the reason otherwise.
async fn readyz(State(store): State<Arc<dyn Store>>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store did not answer within 2s\n".to_string(),
        ),
    }
}
