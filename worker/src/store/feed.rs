//! The job change feed behind `GET /v1/jobs/events`: the store's change events
//! ([`StoreEvent::JobsChanged`], from every process on the store) numbered in the order this
//! process received them, with each job's queue, kind and tags, kept in a bounded replay
//! buffer so a client that reconnects with the last id it saw gets what it missed.
//!
//! Why a buffer in memory rather than reading from the store: the store keeps each job's
//! current state, not the history of its changes, and a change log in the store would cost
//! every claim and completion one more write. The buffer costs nothing until someone
//! subscribes (the feed starts on the first subscription), and holds the last
//! [`REPLAY_CAPACITY`] changes.
//!
//! Ids are `<feed>-<sequence>`: `<feed>` names this feed (a random value per process), the
//! sequence counts up from 1. Ids of one feed order as their sequences do. A client whose
//! last id is from another feed (another replica or an earlier process), or older than the
//! buffer holds, gets a [`FeedItem::Reset`] first: changes were missed, so it should re-read
//! the jobs it cares about (e.g. `GET /v1/jobs?state=…`) and carry on from there.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{JobFilter, Page, Store, StoreEvent};
use crate::error::Result;
use crate::job::{JobId, JobState, check_name};

/// Changes kept for replay.
pub const REPLAY_CAPACITY: usize = 10_000;

/// Jobs whose queue, kind and tags are remembered (they never change), so each job is read
/// once for all its changes. Past this the memory is cleared and refilled.
const KNOWN_CAPACITY: usize = 100_000;

/// One job's change as the feed gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// `<feed>-<sequence>`: what `Last-Event-ID` names.
    pub event_id: String,
    /// The job.
    pub id: JobId,
    /// The state it entered.
    pub state: JobState,
    /// Its queue.
    pub queue: String,
    /// Its kind.
    pub kind: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// When this process received the change.
    pub at: DateTime<Utc>,
    #[serde(skip)]
    seq: u64,
}

/// What a subscription yields.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedItem {
    /// A change that matches the subscription's filter.
    Change(Arc<JobEvent>),
    /// Changes were missed (the resume id is unknown or too old, or this subscriber fell
    /// behind): re-read the jobs of interest, then carry on with the changes that follow.
    Reset {
        /// Why.
        reason: String,
    },
}

/// Which changes a subscription wants. Empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedFilter {
    /// Exactly this queue.
    pub queue: Option<String>,
    /// Exactly this kind.
    pub kind: Option<String>,
    /// Jobs with this tag.
    pub tag: Option<String>,
}

impl FeedFilter {
    /// Checks the names (the same rules as at enqueue).
    pub fn validate(&self) -> Result<()> {
        if let Some(q) = &self.queue {
            check_name("queue", q)?;
        }
        if let Some(k) = &self.kind {
            check_name("kind", k)?;
        }
        if let Some(t) = &self.tag
            && (t.is_empty() || t.len() > 128 || t.chars().any(char::is_control))
        {
            return Err(crate::Error::invalid(
                "tag",
                "must be 1-128 characters without control characters",
            ));
        }
        Ok(())
    }

    fn matches(&self, e: &JobEvent) -> bool {
        self.queue.as_ref().is_none_or(|q| *q == e.queue)
            && self.kind.as_ref().is_none_or(|k| *k == e.kind)
            && self.tag.as_ref().is_none_or(|t| e.tags.contains(t))
    }
}

struct Buffer {
    events: VecDeque<Arc<JobEvent>>,
    next_seq: u64,
}

/// The feed of one process. Cheap to share (`Arc`); starts reading the store's events on the
/// first [`ChangeFeed::subscribe`].
pub struct ChangeFeed {
    store: Arc<dyn Store>,
    name: String,
    buffer: Arc<Mutex<Buffer>>,
    live: broadcast::Sender<Arc<JobEvent>>,
    started: OnceLock<()>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("name", &self.name)
            .finish()
    }
}

/// A subscriber's view: replayed changes first, then live ones.
pub struct Subscription {
    pending: VecDeque<FeedItem>,
    live: broadcast::Receiver<Arc<JobEvent>>,
    filter: FeedFilter,
    last_seq: u64,
}

impl Subscription {
    /// The next item; `None` when the feed has stopped.
    pub async fn next(&mut self) -> Option<FeedItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            match self.live.recv().await {
                Ok(e) => {
                    if e.seq <= self.last_seq {
                        continue;
                    }
                    self.last_seq = e.seq;
                    if self.filter.matches(&e) {
                        return Some(FeedItem::Change(e));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some(FeedItem::Reset {
                        reason: format!(
                            "this subscriber fell {n} changes behind and they were dropped; re-read the jobs you follow"
                        ),
                    });
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl ChangeFeed {
    /// A feed over `store` (not started yet).
    pub fn new(store: Arc<dyn Store>) -> Self {
        let (live, _) = broadcast::channel(REPLAY_CAPACITY);
        Self {
            store,
            name: format!("{:08x}", rand::random::<u32>()),
            buffer: Arc::new(Mutex::new(Buffer {
                events: VecDeque::with_capacity(1024),
                next_seq: 1,
            })),
            live,
            started: OnceLock::new(),
        }
    }

    /// This feed's name, the part of its ids before the `-`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Changes matching `filter` from now on, or, with `last_event_id`, from just after that
    /// event (see the module docs for ids this feed does not hold). Must be called inside a
    /// Tokio runtime (the first call starts the feed's reader task).
    pub fn subscribe(&self, filter: FeedFilter, last_event_id: Option<&str>) -> Subscription {
        self.start();
        let buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        // Subscribed under the lock the reader pushes under: nothing falls between the
        // replay and the live changes.
        let live = self.live.subscribe();
        let newest = buffer.next_seq - 1;
        let mut pending = VecDeque::new();
        let mut last_seq = newest;
        if let Some(id) = last_event_id.map(str::trim).filter(|s| !s.is_empty()) {
            let ours = id
                .split_once('-')
                .filter(|(name, _)| *name == self.name)
                .and_then(|(_, seq)| seq.parse::<u64>().ok());
            let oldest = buffer.events.front().map_or(buffer.next_seq, |e| e.seq);
            match ours {
                Some(seq) if seq <= newest && seq + 1 >= oldest => {
                    last_seq = seq;
                    pending.extend(
                        buffer
                            .events
                            .iter()
                            .filter(|e| e.seq > seq && filter.matches(e))
                            .cloned()
                            .map(FeedItem::Change),
                    );
                }
                Some(_) => pending.push_back(FeedItem::Reset {
                    reason: format!(
                        "event {id} is older than the last {REPLAY_CAPACITY} changes this server keeps; re-read the jobs you follow"
                    ),
                }),
                None => pending.push_back(FeedItem::Reset {
                    reason: format!(
                        "event {id} is not from this server's feed ({}); re-read the jobs you follow",
                        self.name
                    ),
                }),
            }
        }
        drop(buffer);
        Subscription {
            pending,
            live,
            filter,
            last_seq,
        }
    }

    fn start(&self) {
        self.started.get_or_init(|| {
            // Subscribed here, before the first subscriber gets its subscription, so that
            // no change made after `subscribe` returns is missed.
            let events = self.store.subscribe();
            let store = self.store.clone();
            let buffer = self.buffer.clone();
            let live = self.live.clone();
            let name = self.name.clone();
            tokio::spawn(read_changes(store, events, buffer, live, name));
        });
    }
}

/// The reader: store events in, numbered changes out.
async fn read_changes(
    store: Arc<dyn Store>,
    mut events: broadcast::Receiver<StoreEvent>,
    buffer: Arc<Mutex<Buffer>>,
    live: broadcast::Sender<Arc<JobEvent>>,
    name: String,
) {
    let mut known: HashMap<JobId, (String, String, Vec<String>)> = HashMap::new();
    loop {
        let changes = match events.recv().await {
            Ok(StoreEvent::JobsChanged { changes }) if !changes.is_empty() => changes,
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "the job change feed fell behind the store's events"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let unknown: Vec<JobId> = changes
            .iter()
            .map(|c| c.id)
            .filter(|id| !known.contains_key(id))
            .collect();
        if known.len() + unknown.len() > KNOWN_CAPACITY {
            known.clear();
        }
        for chunk in unknown.chunks(1000) {
            let filter = JobFilter {
                ids: chunk.to_vec(),
                ..JobFilter::default()
            };
            let page = Page {
                before: None,
                limit: 1000,
            };
            match store.list(&filter, page).await {
                Ok(jobs) => {
                    for j in jobs {
                        known.insert(j.id, (j.queue, j.kind, j.tags));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading changed jobs for the change feed failed")
                }
            }
        }
        let at = Utc::now();
        let mut buffer = buffer.lock().unwrap_or_else(|e| e.into_inner());
        for change in changes.iter() {
            // A job deleted before it could be read (pruned, discarded) is left out.
            let Some((queue, kind, tags)) = known.get(&change.id) else {
                continue;
            };
            let seq = buffer.next_seq;
            buffer.next_seq += 1;
            let event = Arc::new(JobEvent {
                event_id: format!("{name}-{seq}"),
                id: change.id,
                state: change.state,
                queue: queue.clone(),
                kind: kind.clone(),
                tags: tags.clone(),
                at,
                seq,
            });
            if buffer.events.len() == REPLAY_CAPACITY {
                buffer.events.pop_front();
            }
            buffer.events.push_back(event.clone());
            let _ = live.send(event);
        }
    }
}
