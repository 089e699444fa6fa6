//! `conveyor bench --workload apalis`: the shared protocol with the process and latency phases
//! run by an apalis worker (apalis-core's `WorkerBuilder`) on the same store through
//! `conveyor_apalis`, instead of the native runtime. One kind, `bench.noop`, serves both
//! phases (an apalis worker runs one args type); latency jobs carry their sequence number.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::context::WorkerContext;
use conveyor_apalis::{Config, ConveyorBackend};
use conveyor_worker::Store;
use conveyor_worker::runtime::WorkerConfig;
use serde::{Deserialize, Serialize};

use super::Probe;

/// The args of every job the apalis workload runs: the latency phase sets `seq`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Noop {
    #[serde(default)]
    seq: Option<usize>,
}

/// A running apalis worker: stopped through its context.
pub(super) struct Running {
    ctx: WorkerContext,
    handle: tokio::task::JoinHandle<Result<(), apalis_core::error::WorkerError>>,
}

impl Running {
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        // Stopping before the worker has started is refused; it has by the time jobs ran.
        self.ctx.stop()?;
        self.handle.await??;
        Ok(())
    }
}

/// Starts an apalis worker on `queue` with the native runtime's settings for the rest.
pub(super) fn start(
    store: &Arc<dyn Store>,
    queue: &str,
    concurrency: u32,
    fetch_batch: u32,
    probe: Arc<Probe>,
) -> (Running, String) {
    let native = WorkerConfig::default();
    let config = Config::new("bench.noop", queue)
        .concurrency(concurrency)
        .fetch_batch(fetch_batch);
    let describe = format!(
        "apalis-core 1.0 WorkerBuilder on conveyor-apalis, concurrency {concurrency}, fetch batch {fetch_batch}, completion batch <= {}",
        native.completion_batch
    );
    let backend = ConveyorBackend::<Noop>::new(store.clone(), config);
    let ctx = WorkerContext::new("bench");
    let worker = WorkerBuilder::new(&ctx)
        .backend(backend)
        .build(move |job: Noop| {
            let probe = probe.clone();
            async move {
                match job.seq {
                    Some(seq) => probe.latency_start(seq),
                    None => probe.first_start(),
                }
                probe.ran.fetch_add(1, Ordering::Relaxed);
                Ok::<(), std::convert::Infallible>(())
            }
        });
    let handle = tokio::spawn(worker.run());
    (Running { ctx, handle }, describe)
}
