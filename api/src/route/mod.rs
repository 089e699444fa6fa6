//! The route groups. Each module has a `routes()` returning its `OpenApiRouter`; the crate's
//! `routes()` merges them.

pub mod audit;
pub mod backup;
pub mod email;
pub mod email_suppression;
pub mod email_template;
pub mod http_target;
pub mod job;
pub mod job_events;
pub mod queue;
pub mod remote;
pub mod schedule;
pub mod stats;
pub mod system;
pub mod unsubscribe;
pub mod webhook;
pub mod worker;
