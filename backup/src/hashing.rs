//! A reader that counts and hashes (SHA-256) what passes through it.

use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

/// Counts and hashes the bytes read through it.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    tally: Option<Tally>,
}

impl<R> Hashing<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            progress: None,
            tally: None,
        }
    }

    /// Also adds the bytes read to `counter` (a progress display's).
    pub(crate) fn counting(
        mut self,
        counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    ) -> Self {
        self.progress = counter;
        self
    }

    /// The byte count and hex SHA-256 of everything read so far.
    pub(crate) fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.finalize()))
    }

    /// Also keeps the count and hash in `tally`, readable after this reader was handed to
    /// a decoder that does not give it back.
    pub(crate) fn tallying(mut self, tally: Tally) -> Self {
        self.tally = Some(tally);
        self
    }
}

/// The count and hash of a [`Hashing`] reader, shared.
#[derive(Clone, Default)]
pub(crate) struct Tally(std::sync::Arc<std::sync::Mutex<(u64, Sha256)>>);

impl Tally {
    /// The byte count and hex SHA-256 of everything read so far.
    pub(crate) fn finish(&self) -> (u64, String) {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (t.0, hex::encode(t.1.clone().finalize()))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let new = &buf.filled()[before..];
            let n = new.len() as u64;
            self.hasher.update(new);
            self.bytes += n;
            if let Some(t) = &self.tally {
                let mut t = t.0.lock().unwrap_or_else(|p| p.into_inner());
                t.0 += n;
                t.1.update(new);
            }
            if let Some(c) = &self.progress {
                c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        polled
    }
}
