//! Conveyor, the whole platform as a library: [`App`] runs everything the `conveyor` binary
//! runs — the command line, `serve` with every role, `worker`, the admin commands — with the
//! application's own job kinds registered beside the built-in ones. The `conveyor` binary is
//! `App::new().run()`.
//!
//! A kind is defined once, by its args type ([`JobArgs`]: the kind name, queue, attempts,
//! timeout, priority, uniqueness, retry policy) and its [`Handler`]; the same type enqueues
//! jobs through `conveyor_client` (over HTTP, into the store, or inside the application's
//! Postgres transaction) and is tested with [`testing::run_inline`]. The guide is
//! `docs/own-jobs.md`.

#[macro_use]
mod console;

mod analytics;
mod app;
mod backups;
mod bench;
mod cli;
mod commands;
mod config;
mod email_suppressions;
mod email_templates;
mod emails;
mod http_targets;
mod input;
mod output;
mod schedules;
mod secrets;
mod serve;
mod stats;
mod webhooks;

pub use app::App;

// The guide's code blocks, compiled as doc tests so they cannot fall behind the API. Only
// under `cfg(doctest)`: the guide is not part of the packaged crate.
#[cfg(doctest)]
#[doc = include_str!("../../docs/own-jobs.md")]
mod own_jobs_guide {}
pub use conveyor_worker::{
    Handler, JobArgs, JobContext, JobError, JobState, KindOptions, Outcome, Registry, RetryPolicy,
    testing,
};
