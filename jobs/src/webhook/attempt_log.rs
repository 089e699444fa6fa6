//! Group commit for the attempt logs (webhook deliveries', HTTP-target requests'): each delivery waits until its record is written (so a
//! finished delivery's attempt is always listable), but the records of deliveries that finish
//! at about the same time are written together with one [`MetaStore::meta_put_many`] — one
//! statement on Postgres instead of one per delivery. The writer task starts with the first
//! record and stops when the service is dropped.
//!
//! [`MetaStore::meta_put_many`]: conveyor_worker::store::meta::MetaStore::meta_put_many

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use conveyor_worker::store::meta::Put;
use conveyor_worker::{Error, Store};
use tokio::sync::{mpsc, oneshot};

/// Most records per write.
const BATCH: usize = 500;

struct Pending {
    collection: &'static str,
    key: String,
    value: serde_json::Value,
    ttl: Duration,
    done: oneshot::Sender<Result<(), String>>,
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct AttemptLog {
    tx: OnceLock<mpsc::Sender<Pending>>,
}

impl AttemptLog {
    /// Writes one record into `collection` (with the others waiting at the same moment) and
    /// returns once it is stored.
    pub(crate) async fn write(
        &self,
        store: &Arc<dyn Store>,
        collection: &'static str,
        key: String,
        value: serde_json::Value,
        ttl: Duration,
    ) -> conveyor_worker::Result<()> {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(4 * BATCH);
            tokio::spawn(run(store.clone(), rx));
            tx
        });
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            collection,
            key,
            value,
            ttl,
            done,
        };
        let stopped = || Error::Unsupported("the attempt-log writer stopped".into());
        tx.send(pending).await.map_err(|_| stopped())?;
        answer
            .await
            .map_err(|_| stopped())?
            .map_err(|e| Error::Unsupported(format!("attempt log not written: {e}")))
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let puts: Vec<Put<'_>> = batch
            .iter()
            .map(|p| Put::new(p.collection, &p.key, &p.value).ttl(p.ttl))
            .collect();
        let result = store
            .meta_put_many(&puts)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        drop(puts);
        for p in batch.drain(..) {
            let _ = p.done.send(result.clone());
        }
    }
}
