//! An apalis worker, as an application already has it (a `WorkerBuilder`, tower layers, a
//! handler taking typed args), consuming `welcome.send` jobs from a Conveyor store.
//!
//! `apalis-example apalis-worker --database-url URL` runs the apalis worker; every other
//! command is the whole Conveyor platform (`apalis-example serve`, `enqueue`, `jobs show`,
//! `dead`, …), as the `conveyor` binary runs it, so the dashboard, API and CLI see the jobs the
//! apalis worker runs. See docs/apalis.md.

use std::process::ExitCode;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::error::{AbortError, BoxDynError};
use apalis_core::task::Task;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::builder::WorkerBuilder;
use conveyor::{JobArgs, RetryPolicy};
use conveyor_apalis::{Config, ConveyorBackend};
use serde::{Deserialize, Serialize};
use tower::timeout::TimeoutLayer;
use tower::{Layer, Service};

/// The args of `welcome.send`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// Where to send it.
    pub email: String,
}

impl JobArgs for Welcome {
    const KIND: &'static str = "welcome.send";
    const QUEUE: &'static str = "welcome";
    const MAX_ATTEMPTS: i32 = 3;

    fn retry_policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(200),
            ..RetryPolicy::default()
        }
    }
}

/// The handler, as it was under apalis's own storage.
async fn send_welcome(welcome: Welcome, id: TaskId) -> Result<(), BoxDynError> {
    if !welcome.email.contains('@') {
        // Retrying cannot help: apalis's AbortError makes the job dead at once.
        return Err(AbortError::new(format!("`{}` is not an email address", welcome.email)).into());
    }
    if welcome.email.starts_with("bounce") {
        // Any other error is retried with the kind's backoff until the attempts run out.
        return Err(std::io::Error::other("mail server answered 451: try again later").into());
    }
    tracing::info!(task = %id, "welcome mail sent to {}", welcome.email);
    Ok(())
}

/// A tower layer of the application's own: logs how long each task took.
#[derive(Clone, Debug)]
struct Timing;

impl<S> Layer<S> for Timing {
    type Service = TimingService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TimingService(inner)
    }
}

#[derive(Clone, Debug)]
struct TimingService<S>(S);

impl<S, A> Service<Task<A>> for TimingService<S>
where
    S: Service<Task<A>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, task: Task<A>) -> Self::Future {
        let id = task.ctx().task_id().map(ToString::to_string);
        let attempt = task.ctx().attempt();
        let started = Instant::now();
        let fut = self.0.call(task);
        Box::pin(async move {
            let result = fut.await;
            tracing::info!(
                task = id.as_deref().unwrap_or("?"),
                attempt,
                ok = result.is_ok(),
                took_ms = started.elapsed().as_millis() as u64,
                "task finished"
            );
            result
        })
    }
}

async fn apalis_worker(url: &str) -> anyhow::Result<()> {
    let store = conveyor_worker::store::connect(url, Default::default()).await?;
    let worker_id = format!("apalis-example-{}", std::process::id());
    let backend = ConveyorBackend::<Welcome>::for_args_with(
        store,
        Config::for_args::<Welcome>()
            .worker_id(&worker_id)
            .concurrency(4),
    );
    let worker = WorkerBuilder::new("welcome-mailer")
        .backend(backend)
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .layer(Timing)
        .build(send_welcome);
    tracing::info!(worker = %worker_id, "apalis worker started");
    worker
        .run_until(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => r?,
            }
            Ok::<(), std::io::Error>(())
        })
        .await?;
    tracing::info!("apalis worker stopped");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("apalis-worker") {
        return conveyor::App::new().run();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let url = match args.iter().position(|a| a == "--database-url") {
        Some(i) => args.get(i + 1).cloned(),
        None => std::env::var("CONVEYOR_DATABASE_URL").ok(),
    };
    let Some(url) = url else {
        eprintln!(
            "usage: apalis-example apalis-worker --database-url URL (or CONVEYOR_DATABASE_URL)"
        );
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(apalis_worker(&url)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
