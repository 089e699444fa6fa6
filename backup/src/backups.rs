//! The operations: create, list, show and verify a backup. The CLI, the API and the
//! `backup.run` job all call these.

use std::path::PathBuf;

use async_compression::Level;
use async_compression::tokio::bufread::{ZstdDecoder, ZstdEncoder};
use chrono::Utc;
use tokio::io::{AsyncReadExt, BufReader};
use tokio_util::io::StreamReader;

use crate::config::{BackupConfig, STORE_SOURCE};
use crate::destination::Destination;
use crate::error::{Error, Result};
use crate::hashing::Hashing;
use crate::manifest::{FORMAT, Manifest, ObjectEntry, new_id};

use crate::source::Source;

/// The object a source's dump is stored as.
pub const DATA_OBJECT: &str = "data.zst";

/// Backups as configured, for the store at `store_url`.
#[derive(Clone)]
pub struct Backups {
    config: BackupConfig,
    store_url: String,
    /// Where the status records for `/metrics` are written (none: not recorded).
    status: Option<std::sync::Arc<dyn conveyor_worker::Store>>,
    /// Bytes stored or read so far, for a progress display.
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// The identity file given on the command line (`--identity`), over
    /// `backup.identity_file`.
    identity: Option<PathBuf>,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("config", &self.config)
            .field("records_status", &self.status.is_some())
            .finish_non_exhaustive()
    }
}

/// What `prune` kept and deleted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    /// The destination.
    pub destination: String,
    /// Nothing was deleted: `deleted` is what would have been.
    pub dry_run: bool,
    /// Kept, with the rules that keep each.
    pub kept: Vec<PrunedEntry>,
    /// Deleted (or, with `dry_run`, to be deleted), oldest first per source.
    pub deleted: Vec<PrunedEntry>,
}

/// One backup in [`Pruned`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PrunedEntry {
    /// Its id.
    pub id: String,
    /// Its source.
    pub source: String,
    /// When it started.
    pub started_at: chrono::DateTime<Utc>,
    /// Why it is kept (empty when deleted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<crate::retention::Reason>,
}

/// What `verify` found: every object's checksums matched.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    /// The backup.
    pub id: String,
    /// Its source.
    pub source: String,
    /// Objects checked.
    pub objects: usize,
    /// Stored bytes read.
    pub stored_bytes: u64,
    /// Raw bytes after decoding.
    pub raw_bytes: u64,
    /// Encrypted objects whose stored bytes were checked but which could not be decoded:
    /// no identity was configured (`backup.identity_file`, `--identity`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub undecoded: Vec<String>,
}

impl Backups {
    /// Checks `config` (the error names the key).
    pub fn new(config: BackupConfig, store_url: impl Into<String>) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            store_url: store_url.into(),
            status: None,
            progress: None,
            identity: None,
        })
    }

    /// Adds the bytes each operation stores (create) or reads back (verify, and the check a
    /// restore starts with) to `counter`, for a progress display.
    pub fn with_progress(mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.progress = Some(counter);
        self
    }

    /// Records each complete backup and successful verification in `store` (see
    /// [`crate::status`]), for the backup metrics.
    pub fn with_status(mut self, store: std::sync::Arc<dyn conveyor_worker::Store>) -> Self {
        self.status = Some(store);
        self
    }

    /// Decrypts encrypted backups with the identities in `path` (`--identity FILE`), over
    /// `backup.identity_file`.
    pub fn with_identity(mut self, path: PathBuf) -> Self {
        self.identity = Some(path);
        self
    }

    /// The identities to decrypt with: `--identity`, else `backup.identity_file`, else none.
    /// An unreadable file is a configuration error naming where it was given.
    pub fn identities(&self) -> Result<Option<crate::encryption::Identities>> {
        if let Some(path) = &self.identity {
            return crate::encryption::Identities::read(path, "--identity").map(Some);
        }
        match &self.config.identity_file {
            Some(path) => {
                crate::encryption::Identities::read(path, "backup.identity_file").map(Some)
            }
            None => Ok(None),
        }
    }

    /// The identities for decoding `manifest`'s objects: an encrypted backup without any is
    /// refused (for a restore, which must decode).
    pub(crate) fn identities_for(
        &self,
        manifest: &Manifest,
    ) -> Result<Option<crate::encryption::Identities>> {
        let identities = self.identities()?;
        if manifest.encryption.is_some() && identities.is_none() {
            return Err(Error::Config(format!(
                "backup {} is encrypted (age) and no identity is configured: set backup.identity_file or pass --identity FILE (the identity of one of its recipients)",
                manifest.id
            )));
        }
        Ok(identities)
    }

    /// The configuration.
    pub fn config(&self) -> &BackupConfig {
        &self.config
    }

    /// The store's URL.
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// Destination `name`, or the default one.
    pub fn destination(&self, name: Option<&str>) -> Result<Destination> {
        let name = name.unwrap_or(&self.config.destination);
        let all = self.config.destinations();
        let config = all.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "no backup destination `{name}`; configured: {}",
                all.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        Destination::open(name, config)
    }

    /// Source `name`: `store` or one of `backup.sources`.
    pub fn source(&self, name: &str) -> Result<Source> {
        if name == STORE_SOURCE {
            return Source::store(&self.store_url);
        }
        let config = self.config.sources.get(name).ok_or_else(|| {
            let mut known = vec![STORE_SOURCE.to_string()];
            known.extend(self.config.sources.keys().cloned());
            Error::NotFound(format!(
                "no backup source `{name}`; configured: {} (add [backup.sources.{name}] to the config)",
                known.join(", ")
            ))
        })?;
        Ok(Source::configured(name, config))
    }

    pub(crate) fn scratch(&self) -> PathBuf {
        self.config
            .scratch_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
    }

    /// Backs up `source` to `destination` (the default one when `None`): dump, compress,
    /// upload in parts, then the manifest. On any failure nothing is listed: the parts
    /// written so far are aborted, and without a manifest the backup does not exist.
    pub async fn create(&self, source: &str, destination: Option<&str>) -> Result<Manifest> {
        let source = self.source(source)?;
        let destination = self.destination(destination)?;
        let recipients = self.config.recipients()?;
        let mut sealer = if recipients.is_empty() {
            None
        } else {
            Some(crate::encryption::Sealer::new(&recipients)?)
        };
        let started_at = Utc::now();
        let id = new_id(started_at);
        let part_size = self.config.part_size_mib * 1024 * 1024;
        let mut writer = destination
            .writer(source.name(), &id, DATA_OBJECT, part_size)
            .await?;
        let dump = source.dump(&self.scratch(), &self.config.pg_dump).await;
        let mut dump = match dump {
            Ok(d) => d,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        };
        let mut tables = std::mem::take(&mut dump.tables);
        let migrations = std::mem::take(&mut dump.migrations);
        let reader = std::mem::replace(&mut dump.reader, Box::new(tokio::io::empty()));
        let raw = Hashing::new(reader);
        let mut encoder = ZstdEncoder::with_quality(
            BufReader::with_capacity(1 << 20, raw),
            Level::Precise(self.config.compression_level),
        );
        let mut stored = sha2::Sha256::default();
        let mut stored_bytes = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let copied: Result<()> = async {
            let mut ended = false;
            while !ended {
                let n = encoder
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::source(source.name(), e))?;
                // With recipients, the zstd stream is encrypted as it goes: the ciphertext
                // is what is stored, hashed and counted.
                let chunk: std::borrow::Cow<[u8]> = match &mut sealer {
                    None if n == 0 => break,
                    None => std::borrow::Cow::Borrowed(&buf[..n]),
                    Some(sealer) if n == 0 => {
                        ended = true;
                        std::borrow::Cow::Owned(sealer.finish()?)
                    }
                    Some(sealer) => std::borrow::Cow::Owned(sealer.seal(&buf[..n])?),
                };
                if chunk.is_empty() {
                    continue;
                }
                let n = chunk.len();
                sha2::Digest::update(&mut stored, &chunk);
                stored_bytes += n as u64;
                if let Some(c) = &self.progress {
                    c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                writer
                    .wait_for_capacity(self.config.upload_concurrency)
                    .await
                    .map_err(|e| destination.error("uploading", e))?;
                writer.write(&chunk);
            }
            Ok(())
        }
        .await;
        if let Err(e) = copied {
            dump.abandon().await;
            let _ = writer.abort().await;
            return Err(e);
        }
        // The source must have been read completely (pg_dump exited 0) before the object is
        // completed.
        match dump.finish().await {
            Ok(Some(counted)) => tables = counted,
            Ok(None) => {}
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        }
        writer
            .finish()
            .await
            .map_err(|e| destination.error("completing the upload", e))?;
        let (raw_bytes, raw_sha256) = encoder.into_inner().into_inner().finish();
        let manifest = Manifest {
            format: FORMAT,
            id,
            source: source.name().to_string(),
            source_kind: source.kind(),
            conveyor_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at,
            finished_at: Utc::now(),
            objects: vec![ObjectEntry {
                name: DATA_OBJECT.into(),
                encoding: if sealer.is_some() {
                    vec!["zstd".into(), crate::encryption::AGE.into()]
                } else {
                    vec!["zstd".into()]
                },
                stored_bytes,
                stored_sha256: hex::encode(sha2::Digest::finalize(stored)),
                raw_bytes,
                raw_sha256,
            }],
            tables,
            schemas: source.schemas().to_vec(),
            migrations,
            encryption: sealer.as_ref().map(|_| crate::encryption::Encryption {
                scheme: crate::encryption::AGE.into(),
                recipients: recipients.len(),
            }),
        };
        destination.put_manifest(&manifest).await?;
        if let Some(store) = &self.status {
            crate::status::record(
                store.as_ref(),
                &manifest.source,
                crate::status::Event::Success(manifest.finished_at),
            )
            .await;
        }
        tracing::info!(
            backup = %manifest.id,
            source = %manifest.source,
            destination = %destination.name(),
            raw_bytes,
            stored_bytes,
            "backup complete"
        );
        Ok(manifest)
    }

    /// Re-reads every object of backup `id` and checks its size and SHA-256, stored and
    /// decoded. The error names the first object that does not match. A success is
    /// recorded beside the backup (see [`crate::manifest::VERIFIED`]).
    pub async fn verify(&self, id: &str, destination: Option<&str>) -> Result<Verified> {
        let dest = self.destination(destination)?;
        let manifest = dest.find(id).await?;
        let identities = self.identities()?;
        let verified = self
            .check_objects(&dest, &manifest, identities.as_ref())
            .await?;
        // Only a backup whose content was decoded and checked counts as verified.
        if verified.undecoded.is_empty() {
            self.record_verification(&dest, &manifest, false).await;
        }
        Ok(verified)
    }

    /// Records a successful verification; a destination that refuses the write is logged,
    /// not fatal (the backup did verify).
    pub(crate) async fn record_verification(
        &self,
        dest: &Destination,
        manifest: &Manifest,
        restored: bool,
    ) {
        let record = crate::manifest::Verification {
            verified_at: Utc::now(),
            restored,
        };
        if let Some(store) = &self.status {
            crate::status::record(
                store.as_ref(),
                &manifest.source,
                crate::status::Event::Verified(record.verified_at),
            )
            .await;
        }
        if let Err(e) = dest.put_verification(manifest, &record).await {
            tracing::warn!(backup = %manifest.id, error = %e, "the backup verified, but recording that failed; prune will not count it as verified");
        }
    }

    /// Deletes the backups `[backup.retention]` does not keep, per source, in `destination`
    /// (or says which it would, with `dry_run`). The newest verified backup of each source is
    /// always kept.
    pub async fn prune(&self, destination: Option<&str>, dry_run: bool) -> Result<Pruned> {
        self.config.retention.check()?;
        let dest = self.destination(destination)?;
        let all = dest.list(None).await?;
        let mut by_source: std::collections::BTreeMap<String, Vec<Manifest>> = Default::default();
        for m in all {
            by_source.entry(m.source.clone()).or_default().push(m);
        }
        let mut pruned = Pruned {
            destination: dest.name().to_string(),
            dry_run,
            kept: Vec::new(),
            deleted: Vec::new(),
        };
        for manifests in by_source.values() {
            let mut candidates = Vec::with_capacity(manifests.len());
            for m in manifests {
                candidates.push(crate::retention::Candidate {
                    id: m.id.clone(),
                    started_at: m.started_at,
                    verified: dest.verification(m).await?.is_some(),
                });
            }
            let selection = crate::retention::select(&self.config.retention, &candidates);
            for m in manifests {
                if let Some(reasons) = selection.keep.get(&m.id) {
                    pruned.kept.push(PrunedEntry {
                        id: m.id.clone(),
                        source: m.source.clone(),
                        started_at: m.started_at,
                        reasons: reasons.clone(),
                    });
                }
            }
            // The selection names only these manifests; in its order.
            for m in selection
                .delete
                .iter()
                .filter_map(|id| manifests.iter().find(|m| &m.id == id))
            {
                if !dry_run {
                    dest.delete(m).await?;
                    tracing::info!(backup = %m.id, source = %m.source, "backup pruned");
                }
                pruned.deleted.push(PrunedEntry {
                    id: m.id.clone(),
                    source: m.source.clone(),
                    started_at: m.started_at,
                    reasons: Vec::new(),
                });
            }
        }
        Ok(pruned)
    }

    /// Checks every object of `manifest` against it.
    pub(crate) async fn check_objects(
        &self,
        destination: &Destination,
        manifest: &Manifest,
        identities: Option<&crate::encryption::Identities>,
    ) -> Result<Verified> {
        let mut verified = Verified {
            id: manifest.id.clone(),
            source: manifest.source.clone(),
            objects: 0,
            stored_bytes: 0,
            raw_bytes: 0,
            undecoded: Vec::new(),
        };
        for object in &manifest.objects {
            let damaged = |message: String| Error::Damaged {
                backup: manifest.id.clone(),
                message: format!("object {}: {message}", object.name),
            };
            let encrypted = match object.encoding.as_slice() {
                [z] if z == "zstd" => false,
                [z, a] if z == "zstd" && a == crate::encryption::AGE => true,
                _ => {
                    return Err(damaged(format!(
                        "encoding {:?} is not one this version reads",
                        object.encoding
                    )));
                }
            };
            let stream = destination
                .read(&manifest.source, &manifest.id, &object.name)
                .await?;
            let tally = crate::hashing::Tally::default();
            let stored = Hashing::new(StreamReader::new(stream))
                .counting(self.progress.clone())
                .tallying(tally.clone());
            let (read, raw_bytes, raw_sha256) = match (encrypted, identities) {
                // Without an identity only the stored (encrypted) bytes can be checked.
                (true, None) => {
                    let mut stored = stored;
                    let read = tokio::io::copy(&mut stored, &mut tokio::io::sink()).await;
                    let (stored_bytes, stored_sha256) = tally.finish();
                    if let Err(e) = read {
                        return Err(damaged(format!("cannot be read: {e}")));
                    }
                    if stored_bytes != object.stored_bytes || stored_sha256 != object.stored_sha256
                    {
                        return Err(damaged(format!(
                            "stored bytes differ from the manifest ({stored_bytes} bytes, sha256 {stored_sha256}; expected {} bytes, sha256 {})",
                            object.stored_bytes, object.stored_sha256
                        )));
                    }
                    verified.objects += 1;
                    verified.stored_bytes += stored_bytes;
                    verified.undecoded.push(object.name.clone());
                    continue;
                }
                (true, Some(identities)) => {
                    let plain = identities.decrypt(&manifest.id, stored).await?;
                    let decoder = ZstdDecoder::new(BufReader::with_capacity(1 << 20, plain));
                    let mut raw = Hashing::new(decoder);
                    let read = tokio::io::copy(&mut raw, &mut tokio::io::sink()).await;
                    let (raw_bytes, raw_sha256) = raw.finish();
                    (read, raw_bytes, raw_sha256)
                }
                (false, _) => {
                    let decoder = ZstdDecoder::new(BufReader::with_capacity(1 << 20, stored));
                    let mut raw = Hashing::new(decoder);
                    let read = tokio::io::copy(&mut raw, &mut tokio::io::sink()).await;
                    let (raw_bytes, raw_sha256) = raw.finish();
                    (read, raw_bytes, raw_sha256)
                }
            };
            let (stored_bytes, stored_sha256) = tally.finish();
            if stored_bytes != object.stored_bytes || stored_sha256 != object.stored_sha256 {
                return Err(damaged(format!(
                    "stored bytes differ from the manifest ({stored_bytes} bytes, sha256 {stored_sha256}; expected {} bytes, sha256 {})",
                    object.stored_bytes, object.stored_sha256
                )));
            }
            if let Err(e) = read {
                return Err(damaged(format!("cannot be decoded: {e}")));
            }
            if raw_bytes != object.raw_bytes || raw_sha256 != object.raw_sha256 {
                return Err(damaged(format!(
                    "decoded content differs from the manifest ({raw_bytes} bytes, sha256 {raw_sha256}; expected {} bytes, sha256 {})",
                    object.raw_bytes, object.raw_sha256
                )));
            }
            verified.objects += 1;
            verified.stored_bytes += stored_bytes;
            verified.raw_bytes += raw_bytes;
        }
        Ok(verified)
    }
}
