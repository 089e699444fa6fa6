//! Run apalis 1.0 workers on a Conveyor store.
//!
//! An application that already has apalis workers (apalis-core's `WorkerBuilder`, its tower
//! layers, handlers taking typed args) keeps them and swaps its storage for
//! [`ConveyorBackend`]: jobs are then claimed, leased, retried, dead-lettered and
//! deduplicated by Conveyor's rules, and the dashboard, API and CLI see them like any other.
//!
//! Where to start reading:
//! - [`backend`]: [`ConveyorBackend`], the `Backend` (claims become apalis tasks) and the
//!   `Sink` behind apalis's `TaskSink` (pushes become Conveyor enqueues).
//! - [`finish`]: [`FinishLayer`], the backend's tower layer: how a call ended becomes the
//!   job's next state through the native runtime's `transition`, written before the call
//!   returns.
//! - `lease`: claims (the native fetch loop's rules), the batched outcome writer, the
//!   heartbeat that renews leases.
//! - [`Config`]: what one worker claims, with the native runtime's defaults.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use apalis_core::worker::builder::WorkerBuilder;
//! use conveyor_apalis::ConveyorBackend;
//! use conveyor_worker::JobArgs;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Email { to: String }
//! impl JobArgs for Email { const KIND: &'static str = "email.send"; }
//!
//! async fn send(email: Email) -> Result<(), std::io::Error> {
//!     println!("to {}", email.to);
//!     Ok(())
//! }
//!
//! let store = conveyor_worker::store::connect("sqlite://jobs.db", Default::default()).await?;
//! let backend = ConveyorBackend::<Email>::for_args(store);
//! backend.enqueue(&Email { to: "a@example.com".into() }).await?;
//! WorkerBuilder::new("email").backend(backend).build(send).run().await?;
//! # Ok(()) }
//! ```
//!
//! What maps and what does not: `docs/decisions/0007-apalis-adapter.md`.

pub mod backend;
mod config;
pub mod error;
pub mod finish;
mod lease;

pub use backend::ConveyorBackend;
pub use config::Config;
pub use error::Error;
pub use finish::{FinishLayer, FinishService};
