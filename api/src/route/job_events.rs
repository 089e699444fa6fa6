//! `GET /v1/jobs/events`: job state changes as Server-Sent Events.
//!
//! The changes come from the store's change events, so they include every process on the
//! store (Postgres `LISTEN`, Redis `SUBSCRIBE`; SQLite: this process's own changes). The
//! feed and its replay buffer live in the worker crate (`conveyor_worker::store::feed`).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use conveyor_worker::store::feed::{FeedFilter, FeedItem};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Auth, scope};
use crate::extract::Query;
use crate::problem::Problem;
use crate::state::AppState;
use crate::view::JobStateName;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(job_events))
}

/// How often an idle stream sends a comment, so proxies keep it open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Which changes to stream. Empty: every job's.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Only jobs of this queue.
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub queue: Option<String>,
    /// Only jobs of this kind.
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    pub kind: Option<String>,
    /// Only jobs with this tag.
    pub tag: Option<String>,
}

/// The `data` of a `job` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEventView {
    /// The job.
    pub id: String,
    /// The state it entered.
    #[schema(value_type = JobStateName)]
    pub state: conveyor_worker::JobState,
    /// Its queue.
    pub queue: String,
    /// Its kind.
    pub kind: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// When the server received the change.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// The `data` of a `reset` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResetView {
    /// Why changes were missed.
    pub reason: String,
}

/// Job state changes as they happen (`text/event-stream`), filtered by queue, kind or tag.
///
/// Each change is an event `job` whose `id` is `<feed>-<sequence>` and whose `data` is a
/// `JobEventView`: enqueued (`available`/`scheduled`), claimed (`running`), and every later
/// state (`completed`, `retryable`, `dead`, `cancelled`, …). Reconnect with `Last-Event-ID`
/// to get the changes after that one (this server keeps the last 10,000). When it cannot (the
/// id is from another server or too old, or the client fell behind) the stream sends an
/// event `reset` (`data`: `ResetView`) first: re-read the jobs you follow, then carry on.
/// An idle stream sends a comment every 15 s. Needs a `read` key: an `enqueue` key is
/// refused (403), since the stream shows every application's jobs.
#[utoipa::path(
    get, path = "/v1/jobs/events", tag = "jobs",
    params(
        EventParams,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", description = "`job` events (data: JobEventView) and `reset` events (data: ResetView)", body = JobEventView),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)
    ),
    security(("bearer" = ["read"]))
)]
async fn job_events(
    State(state): State<AppState>,
    _auth: Auth<scope::Read>,
    headers: HeaderMap,
    Query(p): Query<EventParams>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, Problem> {
    let filter = FeedFilter {
        queue: p.queue,
        kind: p.kind,
        tag: p.tag,
    };
    filter.validate()?;
    let last = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str().map_err(|_| {
                Problem::invalid("Last-Event-ID", "must be an event id this stream sent")
            })
        })
        .transpose()?;
    let mut subscription = state.job_events.subscribe(filter, last);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let draining = state.draining.clone();
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                // A server shutting down ends its streams; clients reconnect elsewhere.
                _ = draining.cancelled() => return,
                _ = tx.closed() => return,
                item = subscription.next() => item,
            };
            let event = match item {
                None => return,
                Some(FeedItem::Change(e)) => Event::default()
                    .event("job")
                    .id(e.event_id.clone())
                    .json_data(JobEventView {
                        id: e.id.to_string(),
                        state: e.state,
                        queue: e.queue.clone(),
                        kind: e.kind.clone(),
                        tags: e.tags.clone(),
                        at: e.at,
                    }),
                Some(FeedItem::Reset { reason }) => Event::default()
                    .event("reset")
                    .json_data(ResetView { reason }),
            };
            let Ok(event) = event else { continue };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
