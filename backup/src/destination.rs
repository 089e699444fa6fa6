//! Where backups are stored: a directory or S3-compatible object storage, both through
//! `object_store`. A backup is the folder `<prefix>/<source>/<id>/` holding its objects and,
//! written last, its [`MANIFEST`].

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};

use crate::config::DestinationConfig;
use crate::error::{Error, Result};
use crate::manifest::{MANIFEST, Manifest, VERIFIED, Verification, is_id};

/// An opened destination.
#[derive(Clone)]
pub struct Destination {
    name: String,
    store: Arc<dyn ObjectStore>,
    prefix: Option<Path>,
    /// Where it is, for messages (a directory or `s3://bucket/prefix`).
    location: String,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("location", &self.location)
            .finish()
    }
}

impl Destination {
    /// Opens destination `name` as configured (a directory is created if missing).
    pub fn open(name: &str, config: &DestinationConfig) -> Result<Self> {
        match config {
            DestinationConfig::Dir { path } => {
                std::fs::create_dir_all(path).map_err(Error::io(format!(
                    "creating backup.destinations.{name}.path {}",
                    path.display()
                )))?;
                let store =
                    object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|e| {
                        Error::Destination {
                            destination: name.to_string(),
                            message: format!("{} cannot be used: {e}", path.display()),
                        }
                    })?;
                Ok(Self {
                    name: name.to_string(),
                    store: Arc::new(store),
                    prefix: None,
                    location: path.display().to_string(),
                })
            }
            DestinationConfig::S3 {
                bucket,
                prefix,
                region,
                endpoint,
                access_key_id,
                secret_access_key,
                allow_http,
            } => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region.as_deref().unwrap_or("us-east-1"))
                    .with_allow_http(*allow_http);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(id) = access_key_id {
                    builder = builder.with_access_key_id(id);
                }
                if let Some(secret) = secret_access_key {
                    builder = builder.with_secret_access_key(&secret.0);
                }
                let store = builder.build().map_err(|e| Error::Destination {
                    destination: name.to_string(),
                    message: format!("the S3 settings are not usable: {e}"),
                })?;
                let prefix = prefix.trim_matches('/');
                Ok(Self {
                    name: name.to_string(),
                    store: Arc::new(store),
                    prefix: (!prefix.is_empty()).then(|| Path::from(prefix)),
                    location: format!("s3://{bucket}/{prefix}"),
                })
            }
        }
    }

    /// Its configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn path(&self, parts: &[&str]) -> Path {
        let mut path = self.prefix.clone().unwrap_or_default();
        for p in parts {
            path = path.child(*p);
        }
        path
    }

    /// `value` as the pretty JSON object written at `path`.
    fn encode(&self, path: &Path, value: &impl serde::Serialize) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(value).map_err(|e| Error::Destination {
            destination: self.name.clone(),
            message: format!("cannot encode {path}: {e}"),
        })
    }

    pub(crate) fn error(&self, doing: &str, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { path, .. } => {
                Error::NotFound(format!("{path} is not in destination `{}`", self.name))
            }
            e => Error::Destination {
                destination: self.name.clone(),
                message: format!("{doing} at {} failed: {e}", self.location),
            },
        }
    }

    /// A multipart writer for object `name` of backup `source`/`id`, buffering `part_size`
    /// bytes per part.
    pub(crate) async fn writer(
        &self,
        source: &str,
        id: &str,
        name: &str,
        part_size: usize,
    ) -> Result<WriteMultipart> {
        let path = self.path(&[source, id, name]);
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.error(&format!("starting the upload of {path}"), e))?;
        Ok(WriteMultipart::new_with_chunk_size(upload, part_size))
    }

    /// Writes the manifest: from now on the backup is complete.
    pub(crate) async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = self.path(&[&manifest.source, &manifest.id, MANIFEST]);
        let body = self.encode(&path, manifest)?;
        self.store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| self.error(&format!("writing {path}"), e))?;
        Ok(())
    }

    /// Records that backup `manifest` verified (the sidecar object [`VERIFIED`]; the
    /// manifest itself is never rewritten).
    pub(crate) async fn put_verification(
        &self,
        manifest: &Manifest,
        record: &Verification,
    ) -> Result<()> {
        let path = self.path(&[&manifest.source, &manifest.id, VERIFIED]);
        let body = self.encode(&path, record)?;
        self.store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| self.error(&format!("writing {path}"), e))?;
        Ok(())
    }

    /// The latest verification of backup `manifest`, if it was ever verified. An unreadable
    /// record counts as none.
    pub async fn verification(&self, manifest: &Manifest) -> Result<Option<Verification>> {
        let path = self.path(&[&manifest.source, &manifest.id, VERIFIED]);
        match self.store.get(&path).await {
            Ok(got) => {
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|e| self.error(&format!("reading {path}"), e))?;
                Ok(serde_json::from_slice(&bytes).ok())
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&format!("reading {path}"), e)),
        }
    }

    /// Deletes backup `manifest`: its manifest first (from then on it is not listed as
    /// complete), then every other object in its folder.
    pub(crate) async fn delete(&self, manifest: &Manifest) -> Result<()> {
        let path = self.path(&[&manifest.source, &manifest.id, MANIFEST]);
        self.store
            .delete(&path)
            .await
            .map_err(|e| self.error(&format!("deleting {path}"), e))?;
        let folder = self.path(&[&manifest.source, &manifest.id]);
        let mut rest = Vec::new();
        let mut listing = self.store.list(Some(&folder));
        while let Some(meta) = listing.next().await {
            rest.push(
                meta.map_err(|e| self.error(&format!("listing {folder}"), e))?
                    .location,
            );
        }
        drop(listing);
        for path in rest {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(&format!("deleting {path}"), e)),
            }
        }
        Ok(())
    }

    /// The stored bytes of object `name` of a backup.
    pub(crate) async fn read(
        &self,
        source: &str,
        id: &str,
        name: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>> {
        let path = self.path(&[source, id, name]);
        let got = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.error(&format!("reading {path}"), e))?;
        Ok(got
            .into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed())
    }

    /// Every complete backup (one with a manifest), of `source` or of all sources, oldest
    /// first. A manifest that cannot be read is reported, not skipped: a damaged destination
    /// must not look like an empty one.
    pub async fn list(&self, source: Option<&str>) -> Result<Vec<Manifest>> {
        let root = match source {
            Some(s) => self.path(&[s]),
            None => self.path(&[]),
        };
        let prefix = (root.as_ref() != "").then_some(&root);
        let mut found: Vec<Path> = Vec::new();
        let mut listing = self.store.list(prefix);
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.error("listing backups", e))?;
            if meta.location.filename() == Some(MANIFEST) {
                found.push(meta.location);
            }
        }
        let mut manifests = Vec::with_capacity(found.len());
        for path in found {
            manifests.push(self.read_manifest_at(&path).await?);
        }
        manifests.sort_by(|a, b| {
            (a.started_at, &a.id, &a.source).cmp(&(b.started_at, &b.id, &b.source))
        });
        Ok(manifests)
    }

    /// The manifest of backup `id` (of any source).
    pub async fn find(&self, id: &str) -> Result<Manifest> {
        if !is_id(id) {
            return Err(Error::NotFound(format!(
                "`{id}` is not a backup id (they look like 20261202T040000.123Z-1a2b3c4d; `conveyor backup list` shows them)"
            )));
        }
        let mut sources = Vec::new();
        let prefix = self.prefix.clone();
        let listed = self
            .store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|e| self.error("listing backups", e))?;
        for dir in listed.common_prefixes {
            if let Some(name) = dir.filename() {
                sources.push(name.to_string());
            }
        }
        for source in sources {
            let path = self.path(&[&source, id, MANIFEST]);
            match self.read_manifest_at(&path).await {
                Ok(m) => return Ok(m),
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::NotFound(format!(
            "no complete backup {id} in destination `{}` ({}); `conveyor backup list` shows them",
            self.name, self.location
        )))
    }

    async fn read_manifest_at(&self, path: &Path) -> Result<Manifest> {
        let bytes = self
            .store
            .get(path)
            .await
            .map_err(|e| self.error(&format!("reading {path}"), e))?
            .bytes()
            .await
            .map_err(|e| self.error(&format!("reading {path}"), e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Damaged {
            backup: path.to_string(),
            message: format!("its manifest is not readable: {e}"),
        })
    }
}
