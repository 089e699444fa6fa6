//! The pages and their actions. Each action calls one `conveyor_admin::Admin` operation.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Extension;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use conveyor_admin::job::{BulkAction, BulkRequest, redacted_args};
use conveyor_analytics::query::{self, StatsQuery};
use conveyor_worker::store::feed::{FeedFilter, FeedItem};
use conveyor_worker::store::{JobFilter, Page};
use conveyor_worker::{Job, JobId, JobState};
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::session::{self, Signed};
use super::{chart, render};
use crate::Problem;
use crate::state::AppState;

/// Jobs per page of a listing.
const PAGE_SIZE: u32 = 50;

type Form = axum::Form<Vec<(String, String)>>;
type Connect = Option<Extension<ConnectInfo<SocketAddr>>>;

fn peer(c: &Connect) -> Option<SocketAddr> {
    c.as_ref().map(|e| e.0.0)
}

/// An error page for `problem` (its status, its detail).
pub fn failure(signed: Option<&Signed>, problem: Problem) -> Response {
    if problem.status >= 500 {
        tracing::error!(detail = %problem.detail, "a dashboard request failed");
    }
    let status = problem.status_code();
    render(
        status,
        "error.html",
        context! {
            title => problem.title,
            status => problem.status,
            detail => problem.detail,
            errors => problem.errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>(),
            user => signed.map(Signed::context),
        },
    )
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn fmt_age(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

/// The notice an action's redirect asks its page to show: fixed sentences, so a link cannot
/// make the dashboard say anything else.
fn notice(done: Option<&str>, n: Option<u64>) -> Option<String> {
    let n = n.unwrap_or(1);
    let plural = |word: &str| {
        if n == 1 {
            format!("1 job {word}.")
        } else {
            format!("{n} jobs {word}.")
        }
    };
    Some(match done? {
        "retried" => plural("retried"),
        "cancelled" => "Job cancelled.".into(),
        "cancel-requested" => "Cancel requested: the worker running it stops it.".into(),
        "discarded" => plural("discarded"),
        "purged" => plural("purged"),
        "paused" => "Queue paused: workers fetch nothing from it until it is resumed.".into(),
        "resumed" => "Queue resumed.".into(),
        "schedule-paused" => "Schedule paused: it fires no more until resumed.".into(),
        "schedule-resumed" => "Schedule resumed.".into(),
        "triggered" => "Schedule triggered: one job enqueued now.".into(),
        "endpoint-enabled" => "Endpoint enabled: deliveries resume.".into(),
        "endpoint-disabled" => {
            "Endpoint disabled: nothing is delivered to it until enabled.".into()
        }
        _ => return None,
    })
}

#[derive(Debug, Default, Deserialize)]
pub struct Notice {
    done: Option<String>,
    n: Option<u64>,
}

/// A job as the listings show it.
#[derive(Serialize)]
struct Row {
    id: String,
    kind: String,
    queue: String,
    state: &'static str,
    attempt: i32,
    max_attempts: i32,
    created_at: String,
    error: Option<String>,
}

impl From<&Job> for Row {
    fn from(j: &Job) -> Self {
        Self {
            id: j.id.to_string(),
            kind: j.kind.clone(),
            queue: j.queue.clone(),
            state: j.state.as_str(),
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            created_at: fmt_time(j.created_at),
            error: j.attempts.iter().rev().find_map(|a| a.error.clone()),
        }
    }
}

/// `GET /dashboard`: counts by state and the last hour's charts.
pub async fn overview(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(n): Query<Notice>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let queues = match state.admin().queues().await {
        Ok(q) => q,
        Err(e) => return failure(Some(&signed), e.into()),
    };
    let mut totals: BTreeMap<JobState, i64> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
    for q in &queues {
        for (s, n) in &q.stats.counts {
            *totals.entry(*s).or_default() += n;
        }
    }
    let now = state.clock.now();
    let report = match query::read(
        &state.store,
        &state.stats,
        &StatsQuery {
            from: Some(now - chrono::TimeDelta::hours(1)),
            ..StatsQuery::default()
        },
        now,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return failure(Some(&signed), e.into()),
    };
    let counts: Vec<_> = totals
        .iter()
        .map(|(s, n)| context! { state => s.as_str(), count => n })
        .collect();
    render(
        StatusCode::OK,
        "overview.html",
        context! {
            user => signed.context(),
            nav => "overview",
            notice => notice(n.done.as_deref(), n.n),
            counts,
            queues => queues.len(),
            throughput => minijinja::Value::from_safe_string(chart::throughput(&report.points)),
            failures => minijinja::Value::from_safe_string(chart::failures(&report.points)),
            latency => minijinja::Value::from_safe_string(chart::latency(&report.points)),
            highest => context! {
                completed => format!("{:.0}", chart::highest(&report.points, |p| Some(p.completed as f64))),
                dead => format!("{:.0}", chart::highest(&report.points, |p| Some(p.dead as f64))),
                run_p95 => format!("{:.0}", chart::highest(&report.points, |p| p.run_p95_ms)),
            },
            total => context! {
                completed => report.total.completed,
                dead => report.total.dead,
                cancelled => report.total.cancelled,
                failure_rate => report.total.failure_rate.map(|r| format!("{:.1} %", r * 100.0)),
                run_p95 => report.total.run.p95_ms.map(|v| format!("{v:.0} ms")),
            },
            resolution => report.resolution.to_string(),
        },
    )
}

/// `GET /dashboard/queues`.
pub async fn queues(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(n): Query<Notice>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let queues = match state.admin().queues().await {
        Ok(q) => q,
        Err(e) => return failure(Some(&signed), e.into()),
    };
    let rows: Vec<_> = queues
        .iter()
        .map(|q| {
            let counts: Vec<i64> = JobState::ALL
                .iter()
                .map(|s| q.stats.counts.get(s).copied().unwrap_or(0))
                .collect();
            context! {
                name => q.stats.queue,
                counts,
                oldest => q.stats.oldest_available_age.map(fmt_age),
                paused => q.paused,
                throughput => format!("{:.2}", q.throughput_per_second),
                unserved => q.unserved,
            }
        })
        .collect();
    render(
        StatusCode::OK,
        "queues.html",
        context! {
            user => signed.context(),
            nav => "queues",
            notice => notice(n.done.as_deref(), n.n),
            states => JobState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            queues => rows,
        },
    )
}

/// `POST /dashboard/queues/{name}/{pause|resume}`.
pub async fn queue_action(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    axum::Form(form): Form,
) -> Response {
    let signed = match session::action(&state, &headers, peer(&connect), &form, true).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => {
            return failure(
                Some(&signed),
                Problem::not_found(format!("no queue action `{other}`; use pause or resume")),
            );
        }
    };
    match state
        .admin()
        .set_queue_paused(&signed.actor(), &name, paused)
        .await
    {
        Ok(_) => Redirect::to(&format!(
            "/dashboard/queues?done={}",
            if paused { "paused" } else { "resumed" }
        ))
        .into_response(),
        Err(e) => failure(Some(&signed), e.into()),
    }
}

/// The listing filters of `/dashboard/jobs` and `/dashboard/dead`.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Filters {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    /// Created on or after this day (`YYYY-MM-DD`, UTC).
    #[serde(default)]
    since: Option<String>,
    /// Created before the end of this day (`YYYY-MM-DD`, UTC).
    #[serde(default)]
    until: Option<String>,
    #[serde(default, skip_serializing)]
    cursor: Option<String>,
    #[serde(default, skip_serializing)]
    done: Option<String>,
    #[serde(default, skip_serializing)]
    n: Option<u64>,
}

fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

impl Filters {
    fn filter(&self) -> Result<JobFilter, Problem> {
        let states = match given(&self.state) {
            None => Vec::new(),
            Some(s) => vec![
                JobState::ALL
                    .into_iter()
                    .find(|st| st.as_str() == s)
                    .ok_or_else(|| Problem::invalid("state", format!("unknown state `{s}`")))?,
            ],
        };
        let day = |field: &str, v: &Option<String>| {
            given(v)
                .map(|d| {
                    chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
                        .map_err(|_| {
                            Problem::invalid(
                                field,
                                format!("`{d}` is not a day; use YYYY-MM-DD, e.g. 2026-12-01"),
                            )
                        })
                })
                .transpose()
        };
        Ok(JobFilter {
            states,
            queue: given(&self.queue),
            kind: given(&self.kind),
            tag: given(&self.tag),
            created_after: day("since", &self.since)?,
            created_before: day("until", &self.until)?.map(|d| d + chrono::TimeDelta::days(1)),
            error_contains: given(&self.error),
            ..JobFilter::default()
        })
    }

    /// The filters as a query string (for the next page's link).
    fn query(&self) -> String {
        let mut pairs = Vec::new();
        for (k, v) in [
            ("state", &self.state),
            ("queue", &self.queue),
            ("kind", &self.kind),
            ("error", &self.error),
            ("tag", &self.tag),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if let Some(v) = given(v) {
                pairs.push(format!("{k}={}", urlencode(&v)));
            }
        }
        pairs.join("&")
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One page of jobs the filter selects, and the next page's cursor.
async fn list_page(
    state: &AppState,
    filter: &JobFilter,
    cursor: Option<&str>,
) -> Result<(Vec<Row>, Option<String>), Problem> {
    let before = cursor
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<JobId>()
                .map_err(|_| Problem::invalid("cursor", "not a cursor from a previous page"))
        })
        .transpose()?;
    let jobs = state
        .store
        .list(
            filter,
            Page {
                before,
                limit: PAGE_SIZE,
            },
        )
        .await?;
    let next = (jobs.len() == PAGE_SIZE as usize)
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    Ok((jobs.iter().map(Row::from).collect(), next))
}

/// `GET /dashboard/jobs`: filters, one page (keyset), bulk select.
pub async fn jobs(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(f): Query<Filters>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let page = async {
        let filter = f.filter()?;
        list_page(&state, &filter, f.cursor.as_deref()).await
    };
    let (rows, next) = match page.await {
        Ok(p) => p,
        Err(p) => return failure(Some(&signed), p),
    };
    let q = f.query();
    render(
        StatusCode::OK,
        "jobs.html",
        context! {
            user => signed.context(),
            nav => "jobs",
            notice => notice(f.done.as_deref(), f.n),
            filters => &f,
            states => JobState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            jobs => rows,
            next => next.map(|c| if q.is_empty() { format!("?cursor={c}") } else { format!("?{q}&cursor={c}") }),
            first => f.cursor.as_deref().is_some_and(|c| !c.is_empty()).then(|| format!("?{q}")),
        },
    )
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.trim().is_empty())
}

fn bulk_action(name: Option<&str>) -> Result<BulkAction, Problem> {
    match name {
        Some("retry") => Ok(BulkAction::Retry),
        Some("discard") => Ok(BulkAction::Discard),
        Some("cancel") => Ok(BulkAction::Cancel),
        other => Err(Problem::invalid(
            "action",
            format!(
                "`{}` is not an action; use retry, cancel or discard",
                other.unwrap_or("")
            ),
        )),
    }
}

fn done_word(action: BulkAction) -> &'static str {
    match action {
        BulkAction::Retry => "retried",
        BulkAction::Cancel => "cancelled",
        BulkAction::Discard => "discarded",
    }
}

/// `POST /dashboard/jobs/bulk`: the selected jobs (`id` fields), retried, cancelled or
/// discarded through the admin layer's bulk action.
pub async fn jobs_bulk(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    axum::Form(form): Form,
) -> Response {
    let signed = match session::action(&state, &headers, peer(&connect), &form, true).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let run = async {
        let action = bulk_action(field(&form, "action"))?;
        let ids = form
            .iter()
            .filter(|(k, _)| k == "id")
            .map(|(_, v)| {
                v.parse::<JobId>()
                    .map_err(|_| Problem::invalid("id", format!("`{v}` is not a job id")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Err(Problem::invalid(
                "id",
                "select at least one job (the check boxes of the list)",
            ));
        }
        let done = state
            .admin()
            .bulk(
                &signed.actor(),
                action,
                BulkRequest {
                    filter: JobFilter {
                        ids,
                        ..JobFilter::default()
                    },
                    all: false,
                    dry_run: false,
                },
            )
            .await?;
        Ok::<_, Problem>((action, done.affected))
    };
    match run.await {
        Ok((action, n)) => {
            Redirect::to(&format!("/dashboard/jobs?done={}&n={n}", done_word(action)))
                .into_response()
        }
        Err(p) => failure(Some(&signed), p),
    }
}

fn parse_id(id: &str) -> Result<JobId, Problem> {
    id.parse::<JobId>()
        .map_err(|_| Problem::not_found(format!("`{id}` is not a job id")))
}

/// `GET /dashboard/jobs/{id}`: args (secrets redacted), metadata, attempts, timeline.
pub async fn job(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(n): Query<Notice>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let found =
        async {
            let id = parse_id(&id)?;
            state.store.get(id).await?.ok_or_else(|| {
                Problem::not_found(format!("job {id} not found (discarded or pruned)"))
            })
        };
    let job = match found.await {
        Ok(j) => j,
        Err(p) => return failure(Some(&signed), p),
    };
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let mut timeline = vec![(job.created_at, "enqueued".to_string())];
    for a in &job.attempts {
        timeline.push((a.started_at, format!("attempt {} started", a.attempt)));
        timeline.push((
            a.finished_at,
            format!("attempt {} ended: {}", a.attempt, outcome_name(a.outcome)),
        ));
    }
    if let Some(at) = job.finalized_at {
        timeline.push((at, format!("finished: {}", job.state)));
    }
    if job.state.is_waiting() {
        timeline.push((job.run_at, "due to run".into()));
    }
    timeline.sort_by_key(|(at, _)| *at);
    let attempts: Vec<_> = job
        .attempts
        .iter()
        .rev()
        .map(|a| {
            context! {
                attempt => a.attempt,
                outcome => outcome_name(a.outcome),
                started_at => fmt_time(a.started_at),
                duration_ms => a.duration_ms,
                worker => a.worker,
                error => a.error,
                causes => a.causes,
                traceback => a.traceback,
            }
        })
        .collect();
    let running = job.state == JobState::Running;
    render(
        StatusCode::OK,
        "job.html",
        context! {
            user => signed.context(),
            nav => "jobs",
            notice => notice(n.done.as_deref(), n.n),
            job => context! {
                id => job.id.to_string(),
                kind => job.kind,
                queue => job.queue,
                state => job.state.as_str(),
                priority => job.priority,
                attempt => job.attempt,
                max_attempts => job.max_attempts,
                tags => job.tags,
                idempotency_key => job.idempotency_key,
                lease_owner => job.lease_owner,
                created_at => fmt_time(job.created_at),
                run_at => fmt_time(job.run_at),
                finalized_at => job.finalized_at.map(fmt_time),
                args => pretty(&redacted_args(&job.args)),
                metadata => pretty(&job.metadata),
                result => job.result.as_ref().map(pretty),
                progress => job.progress.as_ref().map(|p| format!("{:.0} %{}", p.percent, p.message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())),
            },
            attempts,
            timeline => timeline.into_iter().map(|(at, what)| context! { at => fmt_time(at), what }).collect::<Vec<_>>(),
            can_retry => !running,
            can_cancel => job.state.is_waiting() || running,
            can_discard => !running,
        },
    )
}

fn outcome_name(o: conveyor_worker::AttemptOutcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// `POST /dashboard/jobs/{id}/{retry|cancel|discard}`.
pub async fn job_action(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    axum::Form(form): Form,
) -> Response {
    let signed = match session::action(&state, &headers, peer(&connect), &form, true).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let run = async {
        let id = parse_id(&id)?;
        let admin = state.admin();
        let actor = signed.actor();
        let to = |done: &str| format!("/dashboard/jobs/{id}?done={done}");
        Ok::<_, Problem>(match action.as_str() {
            "retry" => {
                admin.retry(&actor, id).await?;
                to("retried")
            }
            "cancel" => match admin.cancel(&actor, id).await? {
                conveyor_worker::store::CancelResult::Cancelled => to("cancelled"),
                conveyor_worker::store::CancelResult::Requested => to("cancel-requested"),
            },
            "discard" => {
                admin.discard(&actor, id).await?;
                "/dashboard/jobs?done=discarded&n=1".to_string()
            }
            other => {
                return Err(Problem::not_found(format!(
                    "no job action `{other}`; use retry, cancel or discard"
                )));
            }
        })
    };
    match run.await {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(p) => failure(Some(&signed), p),
    }
}

/// `GET /dashboard/dead`: the dead-letter queue, filtered, with bulk retry and purge.
pub async fn dead(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(f): Query<Filters>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let page = async {
        let mut filter = f.filter()?;
        // Exactly the fields the bulk forms carry, so the list shows what they would touch.
        filter.states = vec![JobState::Dead];
        filter.tag = None;
        filter.created_after = None;
        filter.created_before = None;
        let (rows, next) = list_page(&state, &filter, f.cursor.as_deref()).await?;
        let total = state.store.count(&filter).await?;
        Ok::<_, Problem>((rows, next, total))
    };
    let (rows, next, total) = match page.await {
        Ok(p) => p,
        Err(p) => return failure(Some(&signed), p),
    };
    let q = f.query();
    render(
        StatusCode::OK,
        "dead.html",
        context! {
            user => signed.context(),
            nav => "dead",
            notice => notice(f.done.as_deref(), f.n),
            filters => &f,
            jobs => rows,
            total,
            next => next.map(|c| if q.is_empty() { format!("?cursor={c}") } else { format!("?{q}&cursor={c}") }),
        },
    )
}

/// `POST /dashboard/dead/bulk`: `step=preview` counts what the action would touch (the admin
/// layer's dry run) and asks to confirm; `step=confirm` acts.
pub async fn dead_bulk(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    axum::Form(form): Form,
) -> Response {
    let signed = match session::action(&state, &headers, peer(&connect), &form, true).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let confirm = field(&form, "step") == Some("confirm");
    let f = Filters {
        queue: field(&form, "queue").map(String::from),
        kind: field(&form, "kind").map(String::from),
        error: field(&form, "error").map(String::from),
        ..Filters::default()
    };
    let run = async {
        let action = match bulk_action(field(&form, "action"))? {
            BulkAction::Cancel => {
                return Err(Problem::invalid(
                    "action",
                    "dead jobs cannot be cancelled; retry or purge them",
                ));
            }
            a => a,
        };
        let mut filter = f.filter()?;
        filter.states = vec![JobState::Dead];
        let done = state
            .admin()
            .bulk(
                &signed.actor(),
                action,
                BulkRequest {
                    filter,
                    all: false,
                    dry_run: !confirm,
                },
            )
            .await?;
        Ok::<_, Problem>((action, done))
    };
    let (action, done) = match run.await {
        Ok(d) => d,
        Err(p) => return failure(Some(&signed), p),
    };
    if confirm {
        let word = match action {
            BulkAction::Discard => "purged",
            other => done_word(other),
        };
        return Redirect::to(&format!("/dashboard/dead?done={word}&n={}", done.affected))
            .into_response();
    }
    render(
        StatusCode::OK,
        "confirm.html",
        context! {
            user => signed.context(),
            nav => "dead",
            action => if action == BulkAction::Retry { "retry" } else { "discard" },
            verb => if action == BulkAction::Retry { "Retry" } else { "Purge" },
            matched => done.matched,
            filters => &f,
            back => format!("/dashboard/dead?{}", f.query()),
        },
    )
}

#[derive(Debug, Default, Deserialize)]
pub struct EventParams {
    job: Option<String>,
}

/// `GET /dashboard/events`: an event `change` whenever a job changes state (with the job's id
/// and new state), for the open page to refresh its live regions. `?job=` is only echoed
/// back in the first event, so the page can tell the stream is its own.
pub async fn events(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(p): Query<EventParams>,
) -> Response {
    if let Err(r) = session::page(&state, &headers, peer(&connect)).await {
        // An EventSource follows no redirect to a form: answer 401 so it stops.
        drop(r);
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    }
    let mut subscription = state.job_events.subscribe(FeedFilter::default(), None);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let draining = state.draining.clone();
    let hello = serde_json::json!({ "job": p.job });
    tokio::spawn(async move {
        if tx
            .send(Ok(Event::default().event("hello").data(hello.to_string())))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let item = tokio::select! {
                _ = draining.cancelled() => return,
                _ = tx.closed() => return,
                item = subscription.next() => item,
            };
            let data = match item {
                None => return,
                Some(FeedItem::Change(e)) => {
                    serde_json::json!({ "id": e.id.to_string(), "state": e.state.as_str() })
                }
                Some(FeedItem::Reset { .. }) => serde_json::json!({ "reset": true }),
            };
            let event = Event::default().event("change").data(data.to_string());
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(crate::route::job_events::KEEP_ALIVE))
        .into_response();
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}

/// `GET /dashboard/schedules`: each schedule's next fires in its own zone, its last fire and
/// that job's state, and pause/resume/trigger.
pub async fn schedules(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(n): Query<Notice>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let registry = conveyor_scheduler::registry::Schedules::new(state.store.clone());
    let read = async {
        let now = Utc::now();
        let mut rows = Vec::new();
        for s in registry.list().await? {
            let status = registry.status(s, now).await?;
            let spec = &status.schedule.spec;
            let next: Vec<String> = match spec.compile() {
                Ok(c) if spec.enabled => c
                    .upcoming(now, 3)
                    .times
                    .iter()
                    .map(|t| t.format("%Y-%m-%d %H:%M %:z").to_string())
                    .collect(),
                _ => Vec::new(),
            };
            rows.push(context! {
                name => spec.name,
                cron => spec.cron,
                timezone => spec.timezone,
                kind => spec.kind,
                queue => spec.queue,
                enabled => spec.enabled,
                disabled_reason => status.schedule.disabled_reason,
                next,
                last_fire => status.last_fire.map(fmt_time),
                last_job => status.last_job.map(|j| j.to_string()),
                last_state => status.last_state.map(|s| s.as_str()),
            });
        }
        Ok::<_, Problem>(rows)
    };
    let rows = match read.await {
        Ok(r) => r,
        Err(p) => return failure(Some(&signed), p),
    };
    render(
        StatusCode::OK,
        "schedules.html",
        context! {
            user => signed.context(),
            nav => "schedules",
            notice => notice(n.done.as_deref(), n.n),
            schedules => rows,
        },
    )
}

/// `POST /dashboard/schedules/{name}/{pause|resume|trigger}`.
pub async fn schedule_action(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    axum::Form(form): Form,
) -> Response {
    let signed = match session::action(&state, &headers, peer(&connect), &form, true).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let admin = state.admin();
    let actor = signed.actor();
    let run = async {
        Ok::<_, Problem>(match action.as_str() {
            "pause" => {
                admin.set_schedule_enabled(&actor, &name, false).await?;
                "schedule-paused"
            }
            "resume" => {
                admin.set_schedule_enabled(&actor, &name, true).await?;
                "schedule-resumed"
            }
            "trigger" => {
                admin.trigger_schedule(&actor, &name).await?;
                "triggered"
            }
            other => {
                return Err(Problem::not_found(format!(
                    "no schedule action `{other}`; use pause, resume or trigger"
                )));
            }
        })
    };
    match run.await {
        Ok(done) => Redirect::to(&format!("/dashboard/schedules?done={done}")).into_response(),
        Err(p) => failure(Some(&signed), p),
    }
}

/// `GET /dashboard/workers`: the live worker processes, each with its queues and the jobs it
/// runs now (from the first 500 running jobs).
pub async fn workers(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    use conveyor_worker::runtime::registration::{self, WorkerRegistration};
    let read = async {
        let workers: Vec<(String, WorkerRegistration)> =
            crate::route::queue::all_records(&state, registration::COLLECTION).await?;
        let running = state
            .store
            .list(
                &JobFilter::state(JobState::Running),
                Page {
                    before: None,
                    limit: 500,
                },
            )
            .await?;
        let mut by_worker: BTreeMap<String, Vec<Row>> = BTreeMap::new();
        for job in &running {
            if let Some(owner) = &job.lease_owner {
                by_worker.entry(owner.clone()).or_default().push(job.into());
            }
        }
        Ok::<_, Problem>(
            workers
                .into_iter()
                .map(|(_, w)| {
                    context! {
                        id => w.id,
                        host => w.host,
                        pid => w.pid,
                        started_at => fmt_time(w.started_at),
                        last_heartbeat => fmt_time(w.last_heartbeat),
                        queues => w.queues.iter().map(|q| context! {
                            name => q.name,
                            running => q.running,
                            concurrency => q.concurrency,
                            per_second => format!("{:.2}", q.finished_per_second),
                        }).collect::<Vec<_>>(),
                        jobs => by_worker.remove(&w.id).unwrap_or_default(),
                    }
                })
                .collect::<Vec<_>>(),
        )
    };
    let rows = match read.await {
        Ok(r) => r,
        Err(p) => return failure(Some(&signed), p),
    };
    render(
        StatusCode::OK,
        "workers.html",
        context! { user => signed.context(), nav => "workers", workers => rows },
    )
}

#[derive(Debug, Default, Deserialize)]
pub struct AuditParams {
    cursor: Option<String>,
}

/// `GET /dashboard/audit`: the audit log, newest first, 100 a page. Needs an `admin` key,
/// as `GET /v1/audit` does.
pub async fn audit(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(p): Query<AuditParams>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if !signed
        .session
        .key
        .scope
        .grants(conveyor_admin::key::Scope::Admin)
    {
        return failure(
            Some(&signed),
            Problem::forbidden(format!(
                "the audit log needs a key with the `admin` scope; `{}` has `{}`",
                signed.session.key.name,
                signed.session.key.scope.as_str()
            )),
        );
    }
    let limit = 100;
    let entries =
        match conveyor_admin::audit::list(&state.store, p.cursor.filter(|c| !c.is_empty()), limit)
            .await
        {
            Ok(e) => e,
            Err(e) => return failure(Some(&signed), e.into()),
        };
    let next = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id.clone()))
        .flatten();
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            context! {
                at => fmt_time(e.at),
                actor => e.actor.name,
                address => e.actor.address,
                action => e.action,
                target => serde_json::to_string(&e.target).unwrap_or_default(),
                affected => e.affected,
            }
        })
        .collect();
    render(
        StatusCode::OK,
        "audit.html",
        context! { user => signed.context(), nav => "audit", entries => rows, next },
    )
}

/// `GET /dashboard/webhooks`: every endpoint (secrets never shown) with its health: circuit,
/// failures in a row, the last hour's attempts and success rate; enable/disable.
pub async fn webhooks(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Query(n): Query<Notice>,
) -> Response {
    let signed = match session::page(&state, &headers, peer(&connect)).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let read = async {
        let mut rows = Vec::new();
        for ep in state.webhooks.endpoints().await? {
            let health = state.webhooks.health(&ep.id).await?;
            let circuit = serde_json::to_value(health.circuit)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            rows.push(context! {
                id => ep.id,
                url => ep.url,
                description => ep.description,
                enabled => ep.enabled,
                disabled_reason => ep.disabled_reason,
                event_types => ep.event_types,
                circuit,
                failures => health.consecutive_failures,
                failing_since => health.failing_since.map(fmt_time),
                hour_attempts => health.last_hour.attempts,
                hour_success => health.last_hour.success_rate.map(|r| format!("{:.1} %", r * 100.0)),
                day_attempts => health.last_day.attempts,
                day_success => health.last_day.success_rate.map(|r| format!("{:.1} %", r * 100.0)),
                p50 => health.last_hour.latency_p50_ms,
            });
        }
        Ok::<_, Problem>(rows)
    };
    let rows = match read.await {
        Ok(r) => r,
        Err(p) => return failure(Some(&signed), p),
    };
    render(
        StatusCode::OK,
        "webhooks.html",
        context! {
            user => signed.context(),
            nav => "webhooks",
            notice => notice(n.done.as_deref(), n.n),
            endpoints => rows,
        },
    )
}

/// `POST /dashboard/webhooks/{id}/{enable|disable}`.
pub async fn webhook_action(
    State(state): State<AppState>,
    connect: Connect,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    axum::Form(form): Form,
) -> Response {
    let signed = match session::action(&state, &headers, peer(&connect), &form, true).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let enabled = match action.as_str() {
        "enable" => true,
        "disable" => false,
        other => {
            return failure(
                Some(&signed),
                Problem::not_found(format!(
                    "no endpoint action `{other}`; use enable or disable"
                )),
            );
        }
    };
    match state
        .admin()
        .set_endpoint_enabled(&signed.actor(), &id, enabled)
        .await
    {
        Ok(_) => Redirect::to(&format!(
            "/dashboard/webhooks?done={}",
            if enabled {
                "endpoint-enabled"
            } else {
                "endpoint-disabled"
            }
        ))
        .into_response(),
        Err(e) => failure(Some(&signed), e.into()),
    }
}
