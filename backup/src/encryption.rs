//! Encryption of backups to age X25519 recipients (`backup.recipients`,
//! `backup.recipients_file`): the zstd stream is encrypted as it is uploaded, and decrypted
//! with an identity (`backup.identity_file`, `--identity FILE`) as it is read back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use age::x25519::{Identity, Recipient};

use crate::error::{Error, Result};

/// The `encoding` entry of an encrypted object, outermost last (after `zstd`).
pub const AGE: &str = "age";

/// How a backup's objects are encrypted, as the manifest records it (never to whom).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Encryption {
    /// `age`.
    pub scheme: String,
    /// How many recipients can decrypt it.
    pub recipients: usize,
}

/// The lines of a recipients or identity file that name a key: neither blank nor a `#`
/// comment, with their line numbers.
fn key_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// The recipients `backup.recipients` and `backup.recipients_file` name (empty: backups are
/// not encrypted). The error names the key and the entry.
pub(crate) fn recipients(listed: &[String], file: Option<&Path>) -> Result<Vec<Recipient>> {
    let mut all = Vec::new();
    for (i, r) in listed.iter().enumerate() {
        all.push(r.trim().parse::<Recipient>().map_err(|e| {
            Error::Config(format!(
                "backup.recipients[{i}] = `{r}` is not an age X25519 recipient ({e}): list public keys `age1…` (`age-keygen -y KEYFILE` prints one)"
            ))
        })?);
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "backup.recipients_file = `{}` cannot be read ({e}): point it at a file of age public keys, one a line",
                path.display()
            ))
        })?;
        for (line, r) in key_lines(&text) {
            all.push(r.parse::<Recipient>().map_err(|e| {
                Error::Config(format!(
                    "backup.recipients_file = `{}`, line {line}: `{r}` is not an age X25519 recipient ({e}): list public keys `age1…`, one a line",
                    path.display()
                ))
            })?);
        }
        if all.is_empty() {
            return Err(Error::Config(format!(
                "backup.recipients_file = `{}` names no recipient: list public keys `age1…`, one a line",
                path.display()
            )));
        }
    }
    Ok(all)
}

/// The identities to decrypt backups with, read from `path` (`--identity FILE`, else
/// `backup.identity_file`): `AGE-SECRET-KEY-1…` lines, as `age-keygen` writes them.
#[derive(Clone)]
pub struct Identities {
    keys: Arc<Vec<Identity>>,
    path: PathBuf,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("path", &self.path)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Identities {
    /// Reads the identity file `path`; the error names it (`key`: where it was given).
    pub fn read(path: &Path, key: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "{key} = `{}` cannot be read ({e}): point it at an age identity file (`age-keygen -o FILE` writes one)",
                path.display()
            ))
        })?;
        let mut keys = Vec::new();
        for (line, k) in key_lines(&text) {
            // The key itself is secret: never repeated in the error.
            keys.push(k.parse::<Identity>().map_err(|_| {
                Error::Config(format!(
                    "{key} = `{}`, line {line} is not an age X25519 identity: the file holds `AGE-SECRET-KEY-1…` lines",
                    path.display()
                ))
            })?);
        }
        if keys.is_empty() {
            return Err(Error::Config(format!(
                "{key} = `{}` holds no identity: the file holds `AGE-SECRET-KEY-1…` lines",
                path.display()
            )));
        }
        Ok(Self {
            keys: Arc::new(keys),
            path: path.to_path_buf(),
        })
    }

    /// The file the identities were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decrypts `stored` (an age file), or says that no identity matches.
    pub(crate) async fn decrypt<R>(
        &self,
        backup: &str,
        stored: R,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>>
    where
        R: tokio::io::AsyncRead + Send + Unpin + 'static,
    {
        use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
        let damaged = |e: age::DecryptError| Error::Damaged {
            backup: backup.to_string(),
            message: format!("its age header cannot be read: {e}"),
        };
        let decryptor = age::Decryptor::new_async(stored.compat())
            .await
            .map_err(damaged)?;
        let reader = decryptor
            .decrypt_async(self.keys.iter().map(|k| k as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => Error::Config(format!(
                    "no identity matches this backup's recipients (backup {backup}, identities from `{}`): give the identity of a recipient it was encrypted to with --identity FILE or backup.identity_file",
                    self.path.display()
                )),
                other => damaged(other),
            })?;
        Ok(Box::new(reader.compat()))
    }
}

/// Encrypts what is written to it, handing the ciphertext out in pieces as it is made, so
/// nothing but the current piece is held.
pub(crate) struct Sealer {
    writer: Option<age::stream::StreamWriter<Shared>>,
    out: Shared,
}

#[derive(Clone, Default)]
pub(crate) struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sealer {
    /// Starts an age file to `recipients` (not empty).
    pub(crate) fn new(recipients: &[Recipient]) -> Result<Self> {
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| Error::Config(format!("backup.recipients: {e}")))?;
        let out = Shared::default();
        let writer = encryptor
            .wrap_output(out.clone())
            .map_err(Error::io("starting the encryption".to_string()))?;
        Ok(Self {
            writer: Some(writer),
            out,
        })
    }

    /// Encrypts `plain`; returns the ciphertext made so far.
    pub(crate) fn seal(&mut self, plain: &[u8]) -> Result<Vec<u8>> {
        if let Some(w) = &mut self.writer {
            w.write_all(plain)
                .map_err(Error::io("encrypting".to_string()))?;
        }
        Ok(self.take())
    }

    /// Ends the age file; returns the last ciphertext.
    pub(crate) fn finish(&mut self) -> Result<Vec<u8>> {
        if let Some(w) = self.writer.take() {
            w.finish()
                .map_err(Error::io("ending the encryption".to_string()))?;
        }
        Ok(self.take())
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.out.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
