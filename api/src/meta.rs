//! The store's shared records and token buckets, as the API uses them (keys, audit, queue
//! settings, worker registrations, rate limits).

pub use conveyor_worker::store::meta::{
    Expect, MetaQuery, Put, RateLimit, Record, TokenTake, list_all,
};
