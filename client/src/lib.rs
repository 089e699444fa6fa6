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

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_worker::{Job, JobId, NewJob, Store};
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

impl Enqueue<&StoreClient> {
    /// Inserts it (`Store::enqueue`).
    pub async fn send(self) -> Result<Enqueued> {
        let job = self.job?;
        Ok(self.target.store.enqueue(job).await?)
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
