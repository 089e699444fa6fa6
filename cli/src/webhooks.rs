//! `conveyor webhooks …`: endpoints, events, the attempt log, replay and health. Every command
//! is a thin call into `conveyor_jobs::webhook::Webhooks`, the same service the HTTP API uses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use conveyor_jobs::webhook::delivery::AttemptQuery;
use conveyor_jobs::webhook::endpoint::{EndpointPatch, NewEndpoint};
use conveyor_jobs::webhook::event::SendEvent;
use conveyor_jobs::webhook::{Endpoint, Webhooks};

use crate::output;

/// `webhooks …`
#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Receivers of events: create, list, show, update, delete, rotate-secret, enable, disable.
    #[command(subcommand)]
    Endpoints(EndpointsCommand),
    /// Send an event to every subscribed endpoint (or, with --url, once to one URL).
    Send {
        /// Event type, e.g. invoice.paid.
        #[arg(long = "type", value_name = "TYPE")]
        event_type: String,
        /// The payload (the body's `data`) as JSON, or `@file.json` (`@-`: stdin).
        #[arg(long, default_value = "{}", value_name = "JSON")]
        payload: String,
        /// A second send with this key returns the first event and delivers nothing new.
        #[arg(long, value_name = "KEY", conflicts_with = "url")]
        idempotency_key: Option<String>,
        /// Deliver once to this URL instead of the endpoints.
        #[arg(long)]
        url: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The attempt log of an endpoint or an event, newest first.
    Attempts {
        /// This endpoint's attempts (`direct` for one-off deliveries).
        #[arg(long, required_unless_present = "event", conflicts_with = "event")]
        endpoint: Option<String>,
        /// This event's attempts, across its endpoints.
        #[arg(long)]
        event: Option<String>,
        /// Page size (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this key (printed under a full page).
        #[arg(long)]
        after: Option<String>,
        /// Print JSON (with response bodies and request headers).
        #[arg(long)]
        json: bool,
    },
    /// Send again: one delivery, an endpoint's failed deliveries since a time, or an event.
    Replay {
        /// One delivery (its job id).
        #[arg(long, conflicts_with_all = ["endpoint", "event"])]
        delivery: Option<String>,
        /// Every dead or cancelled delivery of this endpoint created since --since.
        #[arg(long, requires = "since", conflicts_with = "event")]
        endpoint: Option<String>,
        /// RFC 3339 time or an age (2h, 3d).
        #[arg(long)]
        since: Option<String>,
        /// An event, to every endpoint it went to.
        #[arg(long)]
        event: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Success rate and latency over the last hour and day, and the circuit state.
    Health {
        /// Endpoint id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `webhooks endpoints …`
#[derive(Debug, Subcommand)]
pub enum EndpointsCommand {
    /// Create an endpoint; prints its signing secret.
    Create {
        /// Where deliveries are POSTed.
        #[arg(long)]
        url: String,
        #[command(flatten)]
        settings: EndpointFlags,
        /// Use this secret (whsec_…) instead of a generated one.
        #[arg(long)]
        secret: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every endpoint.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One endpoint.
    Show {
        /// Endpoint id.
        id: String,
        /// Print the signing secrets in clear.
        #[arg(long)]
        show_secret: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change an endpoint's settings (only the flags given).
    Update {
        /// Endpoint id.
        id: String,
        /// New URL.
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        settings: EndpointFlags,
        /// Remove the rate limit.
        #[arg(long, conflicts_with = "rate_limit")]
        no_rate_limit: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete an endpoint; its queued deliveries are cancelled.
    Delete {
        /// Endpoint id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sign with a new secret; the old one keeps signing beside it for --overlap.
    RotateSecret {
        /// Endpoint id.
        id: String,
        /// How long the old secret stays valid (default webhooks.secret_overlap).
        #[arg(long)]
        overlap: Option<String>,
        /// Use this secret instead of a generated one.
        #[arg(long)]
        secret: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Enable an endpoint (replays nothing by itself; see `webhooks replay`).
    Enable {
        /// Endpoint id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable an endpoint.
    Disable {
        /// Endpoint id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Settings shared by create and update.
#[derive(Debug, Args)]
pub struct EndpointFlags {
    /// Free text.
    #[arg(long)]
    pub description: Option<String>,
    /// An event type it receives (repeatable; `invoice.*` for a family). None: all.
    #[arg(long = "event-type", value_name = "TYPE")]
    pub event_types: Vec<String>,
    /// An extra header, NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Deliveries per second, across all workers.
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// Request timeout, e.g. 10s.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Waits before each attempt, e.g. 0s,5s,5m,30m.
    #[arg(long, value_delimiter = ',')]
    pub retry_schedule: Vec<String>,
    /// Follow redirects (each hop checked by the SSRF guard).
    #[arg(long)]
    pub follow_redirects: Option<bool>,
}

fn duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text).map_err(|_| {
        crate::input::usage(format!(
            "{flag} `{text}` is not a duration; write e.g. 10s, 5m or 2h"
        ))
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl EndpointFlags {
    fn headers(&self) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        if self.headers.is_empty() {
            return Ok(None);
        }
        let mut out = BTreeMap::new();
        for h in &self.headers {
            let Some((k, v)) = h.split_once('=') else {
                return Err(crate::input::usage(format!(
                    "--header `{h}` must be NAME=VALUE"
                )));
            };
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
        Ok(Some(out))
    }

    fn timeout_ms(&self) -> anyhow::Result<Option<u64>> {
        self.timeout
            .as_deref()
            .map(|t| duration("--timeout", t).map(millis))
            .transpose()
    }

    fn schedule_ms(&self) -> anyhow::Result<Option<Vec<u64>>> {
        if self.retry_schedule.is_empty() {
            return Ok(None);
        }
        self.retry_schedule
            .iter()
            .map(|s| duration("--retry-schedule", s.trim()).map(millis))
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    }
}

fn parse_time(flag: &str, text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = duration(flag, text)?;
    Ok(conveyor_worker::store::before(Utc::now(), age))
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

fn print_endpoint(ep: &Endpoint, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(ep);
    }
    outln!("id:            {}", ep.id);
    outln!("url:           {}", ep.url);
    if !ep.description.is_empty() {
        outln!("description:   {}", ep.description);
    }
    outln!(
        "enabled:       {}{}",
        ep.enabled,
        ep.disabled_reason
            .as_deref()
            .filter(|_| !ep.enabled)
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    outln!(
        "event types:   {}",
        if ep.event_types.is_empty() {
            "all".to_string()
        } else {
            ep.event_types.join(", ")
        }
    );
    for (k, v) in &ep.headers {
        outln!("header:        {k}: {v}");
    }
    if let Some(r) = ep.rate_limit {
        outln!("rate limit:    {r}/s");
    }
    if let Some(t) = ep.timeout_ms {
        outln!("timeout:       {t} ms");
    }
    if let Some(s) = &ep.retry_schedule_ms {
        let waits: Vec<String> = s
            .iter()
            .map(|ms| humantime::format_duration(Duration::from_millis(*ms)).to_string())
            .collect();
        outln!("retry waits:   {}", waits.join(", "));
    }
    for s in &ep.secrets {
        match s.expires_at {
            None => outln!("secret:        {}", s.secret),
            Some(t) => outln!(
                "old secret:    {} (signs until {})",
                s.secret,
                output::time(t)
            ),
        }
    }
    Ok(())
}

/// Runs one `webhooks` command.
pub async fn run(hooks: Webhooks, cmd: WebhooksCommand) -> anyhow::Result<()> {
    match cmd {
        WebhooksCommand::Endpoints(cmd) => endpoints(&hooks, cmd).await,
        WebhooksCommand::Send {
            event_type,
            payload,
            idempotency_key,
            url,
            json,
        } => {
            let payload = crate::input::json_flag("--payload", &payload)?;
            let (event, duplicate) = match url {
                Some(url) => (hooks.send_to_url(&url, &event_type, payload).await?, false),
                None => {
                    let sent = hooks
                        .send_event(SendEvent {
                            event_type,
                            payload,
                            idempotency_key,
                        })
                        .await?;
                    (sent.event, sent.duplicate)
                }
            };
            if json {
                return output::json(&serde_json::json!({"event": event, "duplicate": duplicate}));
            }
            let note = if duplicate {
                " (duplicate idempotency key: this is the first send; nothing new was queued)"
            } else {
                ""
            };
            outln!(
                "{} sent to {} endpoint(s){note}",
                event.id,
                event.deliveries.len()
            );
            for d in &event.deliveries {
                outln!(
                    "  delivery {} -> {}",
                    d.job_id,
                    d.endpoint_id.as_deref().unwrap_or("(one-off URL)")
                );
            }
            Ok(())
        }
        WebhooksCommand::Attempts {
            endpoint,
            event,
            limit,
            after,
            json,
        } => {
            let (attempts, next) = match (endpoint, event) {
                (Some(ep), _) => {
                    let page = hooks
                        .attempts_for_endpoint(&ep, &AttemptQuery { after, limit })
                        .await?;
                    (page.attempts, page.next)
                }
                (None, Some(ev)) => (hooks.attempts_for_event(&ev).await?, None),
                (None, None) => {
                    return Err(crate::input::usage("give --endpoint ID or --event ID"));
                }
            };
            if json {
                return output::json(&serde_json::json!({"attempts": attempts, "next": next}));
            }
            if attempts.is_empty() {
                outln!("no attempts");
                return Ok(());
            }
            let mut t = table(&[
                "at",
                "event",
                "endpoint",
                "try",
                "status",
                "ms",
                "result",
                "error / body",
            ]);
            for a in &attempts {
                let detail = a.error.clone().unwrap_or_else(|| a.response_body.clone());
                let detail: String = detail
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(60)
                    .collect();
                t.add_row(vec![
                    output::time(a.at),
                    a.event_id.clone(),
                    a.endpoint_id.clone().unwrap_or_else(|| "direct".into()),
                    a.attempt.to_string(),
                    a.status.map_or("-".into(), |s| s.to_string()),
                    a.latency_ms.to_string(),
                    a.result.clone(),
                    detail,
                ]);
            }
            outln!("{t}");
            if let Some(next) = next {
                outln!("more: --after {next}");
            }
            Ok(())
        }
        WebhooksCommand::Replay {
            delivery,
            endpoint,
            since,
            event,
            json,
        } => {
            let out = if let Some(d) = delivery {
                let job = hooks.replay_delivery(&d).await?;
                serde_json::json!({"queued": 1, "delivery": job.id.to_string()})
            } else if let Some(ep) = endpoint {
                let since = parse_time("--since", since.as_deref().unwrap_or("1d"))?;
                serde_json::to_value(hooks.replay_failed(&ep, since).await?)?
            } else if let Some(ev) = event {
                serde_json::to_value(hooks.replay_event(&ev).await?)?
            } else {
                return Err(crate::input::usage(
                    "give --delivery JOB, --endpoint ID --since TIME, or --event ID",
                ));
            };
            if json {
                output::json(&out)
            } else {
                outln!(
                    "queued again: {}{}",
                    out["queued"],
                    out.get("skipped")
                        .filter(|s| s.as_u64().unwrap_or(0) > 0)
                        .map(|s| format!(" (skipped, still waiting or running: {s})"))
                        .unwrap_or_default()
                );
                Ok(())
            }
        }
        WebhooksCommand::Health { id, json } => {
            let h = hooks.health(&id).await?;
            if json {
                return output::json(&h);
            }
            outln!(
                "endpoint:  {} ({})",
                h.endpoint_id,
                if h.enabled { "enabled" } else { "disabled" }
            );
            outln!(
                "circuit:   {:?}{}",
                h.circuit,
                h.failing_since
                    .map(|t| format!(
                        ", failing since {} ({} in a row)",
                        output::time(t),
                        h.consecutive_failures
                    ))
                    .unwrap_or_default()
            );
            let mut t = table(&[
                "window",
                "attempts",
                "success rate",
                "avg ms",
                "p50 ms ≤",
                "p99 ms ≤",
            ]);
            for (name, w) in [("last hour", &h.last_hour), ("last day", &h.last_day)] {
                t.add_row(vec![
                    name.to_string(),
                    w.attempts.to_string(),
                    w.success_rate
                        .map_or("-".into(), |r| format!("{:.1} %", r * 100.0)),
                    w.latency_avg_ms.map_or("-".into(), |v| format!("{v:.1}")),
                    w.latency_p50_ms.map_or("-".into(), |v| v.to_string()),
                    w.latency_p99_ms.map_or("-".into(), |v| v.to_string()),
                ]);
            }
            outln!("{t}");
            Ok(())
        }
    }
}

async fn endpoints(hooks: &Webhooks, cmd: EndpointsCommand) -> anyhow::Result<()> {
    match cmd {
        EndpointsCommand::Create {
            url,
            settings,
            secret,
            disabled,
            json,
        } => {
            let ep = hooks
                .create_endpoint(NewEndpoint {
                    url,
                    description: settings.description.clone().unwrap_or_default(),
                    event_types: settings.event_types.clone(),
                    headers: settings.headers()?.unwrap_or_default(),
                    rate_limit: settings.rate_limit,
                    timeout_ms: settings.timeout_ms()?,
                    retry_schedule_ms: settings.schedule_ms()?,
                    follow_redirects: settings.follow_redirects,
                    secret,
                    disabled,
                })
                .await?;
            print_endpoint(&ep, json)
        }
        EndpointsCommand::List { json } => {
            let all: Vec<Endpoint> = hooks
                .endpoints()
                .await?
                .iter()
                .map(Endpoint::redacted)
                .collect();
            if json {
                return output::json(&all);
            }
            if all.is_empty() {
                outln!(
                    "no endpoints; create one with `conveyor webhooks endpoints create --url …`"
                );
                return Ok(());
            }
            let mut t = table(&["id", "url", "enabled", "event types", "rate limit"]);
            for ep in &all {
                t.add_row(vec![
                    ep.id.clone(),
                    ep.url.clone(),
                    ep.enabled.to_string(),
                    if ep.event_types.is_empty() {
                        "all".into()
                    } else {
                        ep.event_types.join(", ")
                    },
                    ep.rate_limit.map_or("-".into(), |r| format!("{r}/s")),
                ]);
            }
            outln!("{t}");
            Ok(())
        }
        EndpointsCommand::Show {
            id,
            show_secret,
            json,
        } => {
            let ep = hooks.endpoint(&id).await?;
            let ep = if show_secret { ep } else { ep.redacted() };
            print_endpoint(&ep, json)
        }
        EndpointsCommand::Update {
            id,
            url,
            settings,
            no_rate_limit,
            json,
        } => {
            let patch = EndpointPatch {
                url,
                description: settings.description.clone(),
                event_types: (!settings.event_types.is_empty())
                    .then(|| settings.event_types.clone()),
                headers: settings.headers()?,
                rate_limit: if no_rate_limit {
                    Some(None)
                } else {
                    settings.rate_limit.map(Some)
                },
                timeout_ms: settings.timeout_ms()?.map(Some),
                retry_schedule_ms: settings.schedule_ms()?.map(Some),
                follow_redirects: settings.follow_redirects.map(Some),
            };
            let ep = hooks.update_endpoint(&id, patch).await?;
            print_endpoint(&ep.redacted(), json)
        }
        EndpointsCommand::Delete { id, json } => {
            hooks.delete_endpoint(&id).await?;
            if json {
                return output::json(&serde_json::json!({ "deleted": id }));
            }
            outln!("{id} deleted");
            Ok(())
        }
        EndpointsCommand::RotateSecret {
            id,
            overlap,
            secret,
            json,
        } => {
            let overlap = overlap
                .as_deref()
                .map(|o| duration("--overlap", o))
                .transpose()?;
            let ep = hooks.rotate_secret(&id, secret, overlap).await?;
            print_endpoint(&ep, json)
        }
        EndpointsCommand::Enable { id, json } => {
            let ep = hooks.set_enabled(&id, true).await?;
            if json {
                return print_endpoint(&ep.redacted(), true);
            }
            outln!(
                "{id} enabled (nothing is replayed by itself: `conveyor webhooks replay --endpoint {id} --since 1d`)"
            );
            Ok(())
        }
        EndpointsCommand::Disable { id, json } => {
            let ep = hooks.set_enabled(&id, false).await?;
            if json {
                return print_endpoint(&ep.redacted(), true);
            }
            outln!("{id} disabled");
            Ok(())
        }
    }
}

/// Registers `webhook.deliver` for `serve`, and runs its queue with
/// `webhooks.concurrency` slots unless the worker's queues already list it.
pub fn register(
    registry: &mut conveyor_worker::Registry,
    worker: &mut conveyor_worker::runtime::WorkerConfig,
    hooks: Arc<Webhooks>,
) {
    let (queue, concurrency) = (hooks.config().queue.clone(), hooks.config().concurrency);
    conveyor_jobs::webhook::register(registry, hooks);
    if !worker.queues.iter().any(|q| q.name == queue) {
        worker.queues.push(conveyor_worker::runtime::QueueConfig {
            name: queue,
            concurrency,
        });
    }
}
