//! Webhook delivery.
pub mod client;
pub mod guard;
pub mod retry_policy;
pub mod signature;
