//! Backups for Conveyor: its own store and the application's databases, each dumped from one
//! consistent snapshot, compressed with zstd, uploaded in parts (memory stays bounded whatever
//! the size) to a directory or S3-compatible storage, and described by a manifest with the
//! SHA-256 of every object and the source's figures at backup time. With
//! `backup.recipients`, the compressed stream is encrypted with age as it is uploaded
//! ([`encryption`]).
//!
//! A backup is complete exactly when its manifest exists; `verify` re-reads it and checks
//! every checksum. See docs/backups.md.

mod backups;
pub mod config;
pub mod destination;
pub mod encryption;
pub mod error;
mod hashing;
pub mod manifest;
pub mod restore;
pub mod retention;
pub mod source;
pub mod status;

pub use backups::{Backups, DATA_OBJECT, Pruned, Verified};
pub use config::{BackupConfig, DestinationConfig, SourceConfig};
pub use encryption::Identities;
pub use error::{Error, Result};
pub use manifest::Manifest;
pub use restore::{RescuedJobs, Restored, Target};
