//! Unversioned operational routes: `/livez`, `/readyz`, `/metrics`, and the API's own
//! description (`/v1/openapi.json` is mounted by the router; `/v1/docs` renders it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use conveyor_jobs::webhook::model::CircuitState;
use conveyor_worker::runtime::pause::{self, QueueSettings};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::authorize;
use crate::key::Scope;
use crate::problem::Problem;
use crate::route::queue::all_records;
use crate::state::AppState;

/// The route group.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(livez))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(docs))
}

/// The process is up.
#[utoipa::path(get, path = "/livez", tag = "system", responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
pub(crate) async fn livez() -> &'static str {
    "ok\n"
}

/// The store answers and its migrations are current; `503` with the reason otherwise, and
/// from the moment the process starts shutting down (while it finishes its running jobs).
#[utoipa::path(get, path = "/readyz", tag = "system", responses(
    (status = 200, description = "`ready`", content_type = "text/plain", body = String),
    (status = 503, description = "`not ready: <reason>`", content_type = "text/plain", body = String),
))]
pub(crate) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_string(),
        );
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store did not answer within 2s\n".to_string(),
        ),
    }
}

/// Prometheus metrics (text format 0.0.4). Needs a `read` key unless
/// `api.metrics.require_key = false`; `api.metrics.listen` serves it without a key on a
/// separate address.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, content_type = "text/plain", body = String), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = ["read"]))
)]
async fn metrics(State(state): State<AppState>, request: Request) -> Result<Response, Problem> {
    if state.config.metrics.require_key {
        let (parts, _) = request.into_parts();
        authorize(&parts, &state, Scope::Read).await?;
    }
    render_metrics(&state).await
}

/// `/metrics` without a key, for the separate metrics listener.
pub(crate) async fn open_metrics(State(state): State<AppState>) -> Result<Response, Problem> {
    render_metrics(&state).await
}

async fn render_metrics(state: &AppState) -> Result<Response, Problem> {
    let mut out = String::with_capacity(16 * 1024);
    conveyor_worker::metrics::global().render(&mut out);
    // Whether the store answers: without it, the store's gauges below cannot be read, and
    // the process's own figures are still worth a scrape.
    let up = matches!(
        tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await,
        Ok(Ok(()))
    );
    let _ = writeln!(
        out,
        "# HELP conveyor_store_up 1 when the store answered a ping within 2 s at this scrape.\n# TYPE conveyor_store_up gauge\nconveyor_store_up {}",
        u8::from(up)
    );
    if up {
        store_gauges(state, &mut out).await?;
    }
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

/// Gauges read from the store at scrape time, the same on every process.
async fn store_gauges(state: &AppState, out: &mut String) -> Result<(), Problem> {
    let stats = state.store.queue_stats().await?;
    let _ = writeln!(
        out,
        "# HELP conveyor_queue_jobs Jobs in the store by queue and state.\n# TYPE conveyor_queue_jobs gauge"
    );
    for s in &stats {
        for (st, n) in &s.counts {
            let _ = writeln!(
                out,
                "conveyor_queue_jobs{{queue=\"{}\",state=\"{st}\"}} {n}",
                escape(&s.queue)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP conveyor_queue_oldest_available_age_seconds Age of the oldest job ready to run.\n# TYPE conveyor_queue_oldest_available_age_seconds gauge"
    );
    for s in &stats {
        let age = s.oldest_available_age.map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(
            out,
            "conveyor_queue_oldest_available_age_seconds{{queue=\"{}\"}} {age}",
            escape(&s.queue)
        );
    }
    let settings: Vec<(String, QueueSettings)> = all_records(state, pause::COLLECTION).await?;
    let _ = writeln!(
        out,
        "# HELP conveyor_queue_paused 1 when workers fetch nothing from the queue.\n# TYPE conveyor_queue_paused gauge"
    );
    for (name, s) in settings {
        let _ = writeln!(
            out,
            "conveyor_queue_paused{{queue=\"{}\"}} {}",
            escape(&name),
            u8::from(s.paused)
        );
    }
    conveyor_backup::status::render(
        &conveyor_backup::status::read(state.store.as_ref()).await?,
        out,
    );
    // Live workers per queue: every queue with jobs, and every queue a worker serves.
    let serving = conveyor_admin::serving::Serving::read(state.store.as_ref()).await?;
    let mut queues: BTreeMap<&str, usize> = stats.iter().map(|s| (s.queue.as_str(), 0)).collect();
    for w in &serving.workers {
        for q in &w.queues {
            *queues.entry(q.name.as_str()).or_default() += 1;
        }
    }
    let _ = writeln!(
        out,
        "# HELP conveyor_queue_live_workers Live worker processes that fetch from the queue.\n# TYPE conveyor_queue_live_workers gauge"
    );
    for (queue, n) in &queues {
        let _ = writeln!(
            out,
            "conveyor_queue_live_workers{{queue=\"{}\"}} {n}",
            escape(queue)
        );
    }
    webhook_gauges(state, out).await
}

/// Per webhook endpoint: its circuit (open or half-open: 1), and whether it was disabled
/// for failing.
async fn webhook_gauges(state: &AppState, out: &mut String) -> Result<(), Problem> {
    let endpoints = state.webhooks.endpoints().await?;
    let now = chrono::Utc::now();
    let mut open = Vec::with_capacity(endpoints.len());
    for ep in &endpoints {
        let circuit = state.webhooks.circuit(&ep.id).await?;
        open.push(circuit.state(now) != CircuitState::Closed);
    }
    let families: [(&str, &str, Vec<bool>); 2] = [
        (
            "conveyor_webhook_endpoint_circuit_open",
            "1 while the endpoint's circuit is open or half-open (deliveries held back after failures).",
            open,
        ),
        (
            "conveyor_webhook_endpoint_auto_disabled",
            "1 when the endpoint was disabled automatically for failing.",
            endpoints.iter().map(|e| e.disabled_for_failing()).collect(),
        ),
    ];
    for (name, help, values) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (ep, v) in endpoints.iter().zip(values) {
            let _ = writeln!(
                out,
                "{name}{{endpoint=\"{}\"}} {}",
                escape(&ep.id),
                u8::from(v)
            );
        }
    }
    Ok(())
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A page that renders `/v1/openapi.json` (self-contained: no external scripts).
#[utoipa::path(get, path = "/v1/docs", tag = "system", responses((status = 200, content_type = "text/html", body = String)))]
async fn docs() -> Response {
    let mut response = Html(DOCS_PAGE).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    response
}

const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Conveyor API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2rem;border-bottom:1px solid #ddd}
.op{border:1px solid #ddd;border-radius:6px;margin:.6rem 0;padding:.5rem .8rem}
.m{font-weight:700;display:inline-block;min-width:4rem;text-transform:uppercase}
.get{color:#0a6}.post{color:#06c}.delete{color:#c30}
code,pre{background:#f5f5f5;padding:.1rem .3rem;border-radius:3px}
pre{padding:.6rem;overflow:auto;font-size:13px}
.scope{float:right;font-size:12px;color:#666}
</style></head><body>
<h1>Conveyor API</h1>
<p>Generated from <a href="/v1/openapi.json">/v1/openapi.json</a>. Send <code>Authorization: Bearer cvk_…</code>.</p>
<div id="out">Loading…</div>
<script>
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
fetch('/v1/openapi.json').then(r => r.json()).then(doc => {
  const byTag = {};
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (typeof op !== 'object' || !op.responses) continue;
      const tag = (op.tags || ['other'])[0];
      (byTag[tag] = byTag[tag] || []).push({path, method, op});
    }
  }
  let html = `<p>${esc(doc.info.description)}</p>`;
  for (const [tag, ops] of Object.entries(byTag)) {
    html += `<h2>${esc(tag)}</h2>`;
    for (const {path, method, op} of ops) {
      const scopes = (op.security || []).flatMap(s => Object.values(s).flat());
      html += `<div class="op"><span class="m ${method}">${method}</span> <code>${esc(path)}</code>`
        + (scopes.length ? `<span class="scope">scope: ${esc(scopes.join(', '))}</span>` : '')
        + `<p>${esc(op.summary || '')} ${esc(op.description || '')}</p>`
        + `<p>Responses: ${Object.keys(op.responses).map(esc).join(', ')}</p>`;
      const body = op.requestBody && op.requestBody.content['application/json'];
      if (body) html += `<details><summary>Request body</summary><pre>${esc(JSON.stringify(body.schema, null, 2))}</pre></details>`;
      html += `</div>`;
    }
  }
  html += `<h2>Schemas</h2><pre>${esc(JSON.stringify(doc.components.schemas, null, 2))}</pre>`;
  document.getElementById('out').innerHTML = html;
}).catch(e => { document.getElementById('out').textContent = 'Cannot load the document: ' + e; });
</script></body></html>
"#;
