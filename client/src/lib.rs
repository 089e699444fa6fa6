//! Typed enqueue for Conveyor, three ways, one builder:
//!
//! - over HTTP to the API, for applications that do not share the database:
//!   `Client::new(url, key)?.enqueue(MyJob { .. }).idempotency_key("k").send().await`
//! - straight into the store, for applications that share it:
//!   `StoreClient::new(store).enqueue(MyJob { .. }).send().await`
//! - inside the application's own Postgres transaction, so the job exists exactly when the
//!   transaction commits: `conveyor_client::enqueue_in(&mut tx, MyJob { .. }).send().await`
//!
//! The args type implements [`JobArgs`] (its `KIND` names the handler); the builder
//! ([`Enqueue`]) sets the queue, run time, priority, idempotency key, tags and metadata. The
//! store paths reuse the store's own enqueue (`Store::enqueue`,
//! `store::postgres::enqueue_in`); nothing is duplicated here.
//!
//! Waiting for an outcome: [`Client::wait`] (and [`Enqueue::send_and_wait`]) long-poll
//! `GET /v1/jobs/{id}?wait=` until the job finishes; [`StoreClient::wait`] waits on the
//! store's change events. [`Client::events`] follows `GET /v1/jobs/events`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::store::wait::{MAX_WAIT, wait_for_end};
use conveyor_worker::{Job, JobId, NewJob, Store};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

pub use conveyor_worker::{Enqueued, JobArgs, JobState};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API refused the request; `problem` is its problem document.
    #[error("the API answered {status}: {} ({})", problem.title, problem.detail)]
    Api {
        /// HTTP status.
        status: u16,
        /// What the API said.
        problem: Problem,
    },
    /// The request did not reach the API, or its answer was unreadable.
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] conveyor_worker::Error),
    /// The args could not be encoded.
    #[error("cannot encode the job args: {0}")]
    Args(#[from] serde_json::Error),
    /// The base URL is not usable.
    #[error("bad API URL `{0}`: use e.g. http://127.0.0.1:8080")]
    BadUrl(String),
    /// The job waited for does not exist (or was deleted while waited for).
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The event stream broke or sent something unreadable.
    #[error("the event stream failed: {0}")]
    Events(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An API problem document (`application/problem+json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// `urn:conveyor:problem:<code>`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Summary.
    #[serde(default)]
    pub title: String,
    /// What went wrong and how to fix it.
    #[serde(default)]
    pub detail: String,
    /// Machine-readable code.
    #[serde(default)]
    pub code: String,
    /// Field errors.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

/// One field's error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A job being enqueued: set options, then `send()`. `T` is where it goes (a [`Client`], a
/// [`StoreClient`], or a Postgres connection).
#[must_use = "nothing is enqueued until .send().await"]
pub struct Enqueue<T> {
    target: T,
    job: Result<NewJob, serde_json::Error>,
}

impl<T> Enqueue<T> {
    fn new<A: JobArgs>(target: T, args: A) -> Self {
        Self {
            target,
            job: args.to_job(),
        }
    }

    fn map(mut self, f: impl FnOnce(NewJob) -> NewJob) -> Self {
        self.job = self.job.map(f);
        self
    }

    /// Put it on `queue` (default `default`).
    pub fn queue(self, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        self.map(|j| j.queue(queue))
    }

    /// Smaller runs first (default 0).
    pub fn priority(self, priority: i16) -> Self {
        self.map(|j| j.priority(priority))
    }

    /// Attempts before the job goes dead (default 20).
    pub fn max_attempts(self, n: i32) -> Self {
        self.map(|j| j.max_attempts(n))
    }

    /// Run no earlier than `at`.
    pub fn run_at(self, at: DateTime<Utc>) -> Self {
        self.map(|j| j.run_at(at))
    }

    /// Run after `delay`, counted on the store's clock when the job is inserted (not on this
    /// machine's, which may be off). Over HTTP the API takes whole seconds: the delay is
    /// rounded up.
    pub fn delay(self, delay: Duration) -> Self {
        self.map(|j| j.delay(delay))
    }

    /// Deduplicate: a second enqueue with this key returns the first job (marked duplicate).
    pub fn idempotency_key(self, key: impl Into<String>) -> Self {
        let key = key.into();
        self.map(|j| j.idempotency_key(key))
    }

    /// Labels.
    pub fn tags<I, S>(self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tags: Vec<String> = tags.into_iter().map(Into::into).collect();
        self.map(|j| j.tags(tags))
    }

    /// Application metadata (a JSON object).
    pub fn metadata(self, metadata: serde_json::Value) -> Self {
        self.map(|j| j.metadata(metadata))
    }

    /// The job as it would be sent.
    pub fn job(&self) -> Result<&NewJob, &serde_json::Error> {
        self.job.as_ref()
    }
}

/// An HTTP client of the API.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

#[derive(Serialize)]
struct EnqueueBody<'a> {
    kind: &'a str,
    queue: &'a str,
    args: &'a serde_json::Value,
    priority: i16,
    max_attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    tags: &'a [String],
    metadata: &'a serde_json::Value,
}

#[derive(Deserialize)]
struct EnqueueAnswer {
    duplicate: bool,
    job: Job,
}

impl Client {
    /// A client of the API at `base_url` (e.g. `http://127.0.0.1:8080`) using `api_key`
    /// (`cvk_…`, with the `enqueue` scope to enqueue, `read` to get jobs).
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Result<Self> {
        let base = base_url.into().trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::BadUrl(base));
        }
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            base,
            key: api_key.into(),
        })
    }

    /// Starts an enqueue of `args`.
    pub fn enqueue<A: JobArgs>(&self, args: A) -> Enqueue<&Client> {
        Enqueue::new(self, args)
    }

    /// The job once it has finished (completed, cancelled or dead), or as it is when
    /// `timeout` runs out (check its `state`). Long-polls `GET /v1/jobs/{id}?wait=` in steps
    /// of at most 60 s, so any timeout works; the answer comes as soon as the job finishes.
    /// Needs a key with the `read` scope.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<Job> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let step = left.min(MAX_WAIT);
            let response = self
                .http
                .get(format!("{}/v1/jobs/{id}", self.base))
                .query(&[("wait", format!("{}ms", step.as_millis()))])
                .bearer_auth(&self.key)
                // The server answers by the end of the wait; allow for the trip.
                .timeout(step + Duration::from_secs(30))
                .send()
                .await?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Err(Error::NotFound(id));
            }
            let job: Job = answer(response).await?;
            if job.state.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(job);
            }
        }
    }

    /// Follows job state changes (`GET /v1/jobs/events`) matching `filter`, from now on, or
    /// after `last_event_id` (an [`JobEvent::event_id`] seen before). Needs a `read` key.
    pub async fn events(&self, filter: EventFilter, last_event_id: Option<&str>) -> Result<Events> {
        let mut query = Vec::new();
        for (name, value) in [
            ("queue", &filter.queue),
            ("kind", &filter.kind),
            ("tag", &filter.tag),
        ] {
            if let Some(v) = value {
                query.push((name, v.clone()));
            }
        }
        // The stream has no end: no overall timeout, only the one for connecting.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .build()?;
        let mut request = http
            .get(format!("{}/v1/jobs/events", self.base))
            .query(&query)
            .bearer_auth(&self.key)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await?;
        if !response.status().is_success() {
            return Err(answer::<serde_json::Value>(response)
                .await
                .err()
                .unwrap_or_else(|| Error::Events("the server refused the stream".into())));
        }
        let bytes = futures::stream::unfold(response, |mut response| async move {
            match response.chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), response)),
                Ok(None) => None,
                Err(e) => Some((Err(e), response)),
            }
        });
        Ok(Events {
            inner: Box::pin(bytes.eventsource()),
        })
    }

    /// One job with its attempt history; `None` if there is no such job.
    pub async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let response = self
            .http
            .get(format!("{}/v1/jobs/{id}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(answer(response).await?))
    }

    async fn send_job(&self, job: &NewJob) -> Result<Enqueued> {
        let body = EnqueueBody {
            kind: &job.kind,
            queue: &job.queue,
            args: &job.args,
            priority: job.priority,
            max_attempts: job.max_attempts,
            run_at: job.run_at,
            delay_seconds: job.delay.map(|d| {
                let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                u32::try_from(whole).unwrap_or(u32::MAX)
            }),
            idempotency_key: job.idempotency_key.as_deref(),
            tags: &job.tags,
            metadata: &job.metadata,
        };
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        let a: EnqueueAnswer = answer(response).await?;
        Ok(Enqueued {
            id: a.job.id,
            state: a.job.state,
            duplicate: a.duplicate,
        })
    }
}

async fn answer<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T> {
    let status = response.status();
    if status.is_success() {
        return Ok(response.json().await?);
    }
    let text = response.text().await.unwrap_or_default();
    let problem = serde_json::from_str(&text).unwrap_or_else(|_| Problem {
        kind: String::new(),
        title: status.canonical_reason().unwrap_or("error").to_string(),
        detail: text,
        code: String::new(),
        errors: Vec::new(),
    });
    Err(Error::Api {
        status: status.as_u16(),
        problem,
    })
}

impl Enqueue<&Client> {
    /// Sends it to the API.
    pub async fn send(self) -> Result<Enqueued> {
        let job = self.job?;
        self.target.send_job(&job).await
    }

    /// Sends it, then waits up to `timeout` for it to finish ([`Client::wait`]): the job with
    /// its `result` once finished, else as it is at the timeout. The key needs `enqueue` and
    /// `read` (an `admin` key), or the enqueue is sent and the wait refused.
    pub async fn send_and_wait(self, timeout: Duration) -> Result<Job> {
        let client = self.target;
        let enqueued = self.send().await?;
        client.wait(enqueued.id, timeout).await
    }
}

/// Which changes [`Client::events`] follows. Empty fields match every job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only jobs with this tag.
    pub tag: Option<String>,
}

impl EventFilter {
    /// Only jobs of `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Only jobs of `kind`.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Only jobs with `tag`.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }
}

/// One job's state change from `GET /v1/jobs/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// The stream's id for this change: pass it to [`Client::events`] to resume after it.
    #[serde(default)]
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
    #[serde(default)]
    pub tags: Vec<String>,
    /// When the server received the change.
    pub at: DateTime<Utc>,
}

/// What [`Events`] yields.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientEvent {
    /// A job changed state.
    Job(JobEvent),
    /// Changes were missed (resumed from an id the server no longer has, or fell behind):
    /// re-read the jobs you follow.
    Reset {
        /// The server's explanation.
        reason: String,
    },
}

type EventBytes = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

/// An open `GET /v1/jobs/events` stream.
pub struct Events {
    inner: EventBytes,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// The next change; `None` when the server ended the stream (it is shutting down:
    /// reconnect with the last event id).
    pub async fn next(&mut self) -> Option<Result<ClientEvent>> {
        loop {
            let event = match self.inner.next().await? {
                Ok(e) => e,
                Err(e) => return Some(Err(Error::Events(e.to_string()))),
            };
            match event.event.as_str() {
                "job" => {
                    return Some(
                        serde_json::from_str::<JobEvent>(&event.data)
                            .map(|mut e| {
                                e.event_id = event.id;
                                ClientEvent::Job(e)
                            })
                            .map_err(|e| Error::Events(format!("unreadable job event: {e}"))),
                    );
                }
                "reset" => {
                    #[derive(Deserialize)]
                    struct Reset {
                        reason: String,
                    }
                    return Some(
                        serde_json::from_str::<Reset>(&event.data)
                            .map(|r| ClientEvent::Reset { reason: r.reason })
                            .map_err(|e| Error::Events(format!("unreadable reset event: {e}"))),
                    );
                }
                // Events this client does not know are skipped.
                _ => continue,
            }
        }
    }
}

/// Enqueues straight into a store the application shares with the workers.
#[derive(Clone)]
pub struct StoreClient {
    store: Arc<dyn Store>,
}

impl StoreClient {
    /// A client over `store` (from `conveyor_worker::store::connect`).
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Starts an enqueue of `args`.
    pub fn enqueue<A: JobArgs>(&self, args: A) -> Enqueue<&StoreClient> {
        Enqueue::new(self, args)
    }
}

impl StoreClient {
    /// The job once it has finished (completed, cancelled or dead), or as it is when
    /// `timeout` runs out; woken by the store's change events
    /// (`conveyor_worker::store::wait::wait_for_end`, in steps of at most 60 s).
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<Job> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let job = wait_for_end(self.store.as_ref(), id, left.min(MAX_WAIT))
                .await?
                .ok_or(Error::NotFound(id))?;
            if job.state.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(job);
            }
        }
    }
}

impl Enqueue<&StoreClient> {
    /// Inserts it (`Store::enqueue`).
    pub async fn send(self) -> Result<Enqueued> {
        let job = self.job?;
        Ok(self.target.store.enqueue(job).await?)
    }

    /// Inserts it, then waits up to `timeout` for it to finish ([`StoreClient::wait`]).
    pub async fn send_and_wait(self, timeout: Duration) -> Result<Job> {
        let client = self.target;
        let enqueued = self.send().await?;
        client.wait(enqueued.id, timeout).await
    }
}

/// Starts an enqueue of `args` on the caller's Postgres connection or transaction
/// (`&mut *tx`): the job exists exactly when that transaction commits.
pub fn enqueue_in<A: JobArgs>(
    conn: &mut sqlx::PgConnection,
    args: A,
) -> Enqueue<&mut sqlx::PgConnection> {
    Enqueue::new(conn, args)
}

impl Enqueue<&mut sqlx::PgConnection> {
    /// Inserts it on the connection (`store::postgres::enqueue_in`).
    pub async fn send(self) -> Result<Enqueued> {
        let job = self.job?;
        Ok(conveyor_worker::store::postgres::enqueue_in(self.target, job).await?)
    }
}
