//! Process-local metrics in the Prometheus text format: a small registry of counter and
//! histogram families keyed by label values.
//!
//! The hot path stays cheap: a family is looked up once per (queue, kind) and the returned
//! `Arc` is kept by the caller (the runtime keeps one per kind per queue loop), so recording
//! a job is a few relaxed atomic adds — no allocation, no lock. Gauges that describe the
//! store (queue depth, oldest job age) are not here: the API reads them at scrape time.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the duration histograms: 1 ms to 5 min.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
];

/// A histogram of durations over [`DURATION_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// A family of series of `M` keyed by label values.
#[derive(Debug)]
pub struct Family<M> {
    labels: &'static [&'static str],
    series: RwLock<HashMap<Vec<String>, Arc<M>>>,
}

impl<M: Default> Family<M> {
    fn new(labels: &'static [&'static str]) -> Self {
        Self {
            labels,
            series: RwLock::new(HashMap::new()),
        }
    }

    /// The series for these label values (created on first use). Keep the `Arc` on hot paths.
    pub fn get(&self, values: &[&str]) -> Arc<M> {
        debug_assert_eq!(values.len(), self.labels.len());
        {
            let map = self.series.read().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = map.iter().find_map(|(k, m)| {
                (k.iter().map(String::as_str).eq(values.iter().copied())).then_some(m)
            }) {
                return m.clone();
            }
        }
        let key: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        self.series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    fn snapshot(&self) -> Vec<(Vec<String>, Arc<M>)> {
        let map = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn label_text(&self, values: &[String]) -> String {
        self.labels
            .iter()
            .zip(values)
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the runtime records for one (queue, kind).
#[derive(Debug, Default)]
pub struct JobSeries {
    /// Attempts that completed the job.
    pub completed: Counter,
    /// Attempts that failed (error, panic, timeout, lease expiry seen by the worker).
    pub failed: Counter,
    /// Failed attempts that were scheduled for another try.
    pub retried: Counter,
    /// Jobs that went `dead`.
    pub dead: Counter,
    /// Jobs cancelled while running.
    pub cancelled: Counter,
    /// Handler wall time.
    pub execution: Histogram,
    /// From `run_at` (when it became due) to the start of the attempt.
    pub queue_wait: Histogram,
}

/// What `email.send` records for one (transport, recipient domain), one count per
/// recipient per try.
#[derive(Debug, Default)]
pub struct EmailSeries {
    /// Accepted by the server (`250` to the end of the data).
    pub sent: Counter,
    /// Refused for good (a 5xx).
    pub failed: Counter,
    /// Of the refused, hard bounces (an enhanced status 5.1.x: no such mailbox or domain).
    pub bounced: Counter,
    /// Deferred for a later attempt (a 4xx, greylisting, a failed connection).
    pub deferred: Counter,
    /// Held back by a throttle (see docs/email.md, Throttles).
    pub throttled: Counter,
    /// Skipped because the address is on the suppression list.
    pub suppressed: Counter,
}

/// One process's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Jobs enqueued through this process (API, client), by queue and kind.
    pub enqueued: Family<Counter>,
    /// Per (queue, kind) runtime series.
    pub jobs: Family<JobSeries>,
    /// Lease rescues run by this process's rescuer, by outcome (`retried`, `dead`, `cancelled`).
    pub rescues: Family<Counter>,
    /// HTTP requests by method, route and status.
    pub http_requests: Family<Counter>,
    /// HTTP request durations by method and route.
    pub http_duration: Family<Histogram>,
    /// `email.send` recipients by transport and recipient domain.
    pub emails: Family<EmailSeries>,
    /// Webhook delivery attempts by outcome (`delivered`, `retry`, `failed`).
    pub webhook_deliveries: Family<Counter>,
    /// Cron ticks this process enqueued, by schedule.
    pub cron_fires: Family<Counter>,
    /// Cron ticks that fired no job, by schedule: dropped by the missed-tick policy, or
    /// skipped because the previous tick's job was unfinished (`overlap = "skip"`).
    pub cron_missed: Family<Counter>,
    /// From a tick's time to its job being enqueued, by schedule.
    pub cron_lag: Family<Histogram>,
}

/// The process-wide registry.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(|| Metrics {
        enqueued: Family::new(&["queue", "kind"]),
        jobs: Family::new(&["queue", "kind"]),
        rescues: Family::new(&["outcome"]),
        http_requests: Family::new(&["method", "route", "status"]),
        http_duration: Family::new(&["method", "route"]),
        emails: Family::new(&["transport", "domain"]),
        webhook_deliveries: Family::new(&["outcome"]),
        cron_fires: Family::new(&["schedule"]),
        cron_missed: Family::new(&["schedule"]),
        cron_lag: Family::new(&["schedule"]),
    })
}

impl Metrics {
    /// Appends every family in the text exposition format.
    pub fn render(&self, out: &mut String) {
        counter_family(
            out,
            "conveyor_jobs_enqueued_total",
            "Jobs enqueued through this process.",
            &self.enqueued,
            |c| c.get(),
        );
        let jobs = self.jobs.snapshot();
        type Pick = fn(&JobSeries) -> u64;
        let counters: [(&str, &str, Pick); 5] = [
            (
                "conveyor_jobs_completed_total",
                "Jobs completed by this process's workers.",
                |s| s.completed.get(),
            ),
            (
                "conveyor_jobs_failed_total",
                "Attempts that failed in this process's workers.",
                |s| s.failed.get(),
            ),
            (
                "conveyor_jobs_retried_total",
                "Failed attempts scheduled for another try.",
                |s| s.retried.get(),
            ),
            (
                "conveyor_jobs_dead_total",
                "Jobs that went dead in this process's workers.",
                |s| s.dead.get(),
            ),
            (
                "conveyor_jobs_cancelled_total",
                "Running jobs cancelled in this process's workers.",
                |s| s.cancelled.get(),
            ),
        ];
        for (name, help, pick) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, s) in &jobs {
                let _ = writeln!(
                    out,
                    "{name}{{{}}} {}",
                    self.jobs.label_text(labels),
                    pick(s)
                );
            }
        }
        type PickH = fn(&JobSeries) -> &Histogram;
        let hists: [(&str, &str, PickH); 2] = [
            (
                "conveyor_job_execution_seconds",
                "Handler wall time per attempt.",
                |s| &s.execution,
            ),
            (
                "conveyor_job_queue_wait_seconds",
                "Time from a job being due to its attempt starting.",
                |s| &s.queue_wait,
            ),
        ];
        for (name, help, pick) in hists {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (labels, s) in &jobs {
                histogram(out, name, &self.jobs.label_text(labels), pick(s));
            }
        }
        counter_family(
            out,
            "conveyor_lease_rescues_total",
            "Expired leases rescued by this process, by outcome.",
            &self.rescues,
            |c| c.get(),
        );
        counter_family(
            out,
            "conveyor_http_requests_total",
            "HTTP requests answered, by method, route and status.",
            &self.http_requests,
            |c| c.get(),
        );
        let emails = self.emails.snapshot();
        type PickE = fn(&EmailSeries) -> u64;
        let email_counters: [(&str, &str, PickE); 6] = [
            (
                "conveyor_emails_sent_total",
                "Email recipients accepted by the SMTP server, by transport and recipient domain.",
                |s| s.sent.get(),
            ),
            (
                "conveyor_emails_failed_total",
                "Email recipients refused for good (5xx), by transport and recipient domain.",
                |s| s.failed.get(),
            ),
            (
                "conveyor_emails_bounced_total",
                "Refused email recipients that were hard bounces (5.1.x).",
                |s| s.bounced.get(),
            ),
            (
                "conveyor_emails_deferred_total",
                "Email recipients deferred to a later attempt (4xx, connection failures).",
                |s| s.deferred.get(),
            ),
            (
                "conveyor_emails_throttled_total",
                "Email recipients held back by a throttle.",
                |s| s.throttled.get(),
            ),
            (
                "conveyor_emails_suppressed_total",
                "Email recipients skipped as suppressed.",
                |s| s.suppressed.get(),
            ),
        ];
        for (name, help, pick) in email_counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, s) in &emails {
                let _ = writeln!(
                    out,
                    "{name}{{{}}} {}",
                    self.emails.label_text(labels),
                    pick(s)
                );
            }
        }
        let name = "conveyor_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP request durations by method and route.\n# TYPE {name} histogram"
        );
        for (labels, h) in self.http_duration.snapshot() {
            histogram(out, name, &self.http_duration.label_text(&labels), &h);
        }
        counter_family(
            out,
            "conveyor_webhook_deliveries_total",
            "Webhook delivery attempts made by this process, by outcome (delivered, retry, failed).",
            &self.webhook_deliveries,
            |c| c.get(),
        );
        counter_family(
            out,
            "conveyor_cron_fires_total",
            "Cron ticks whose job this process enqueued, by schedule.",
            &self.cron_fires,
            |c| c.get(),
        );
        counter_family(
            out,
            "conveyor_cron_missed_ticks_total",
            "Cron ticks that fired no job (missed-tick policy, or overlap = skip), by schedule.",
            &self.cron_missed,
            |c| c.get(),
        );
        let name = "conveyor_cron_fire_lag_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from a cron tick to its job being enqueued, by schedule.\n# TYPE {name} histogram"
        );
        for (labels, h) in self.cron_lag.snapshot() {
            histogram(out, name, &self.cron_lag.label_text(&labels), &h);
        }
    }
}

fn counter_family<M: Default>(
    out: &mut String,
    name: &str,
    help: &str,
    family: &Family<M>,
    value: impl Fn(&M) -> u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, m) in family.snapshot() {
        let _ = writeln!(
            out,
            "{name}{{{}}} {}",
            family.label_text(&labels),
            value(&m)
        );
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += h.buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
        );
    }
    let count = h.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family's name, type and label names, as scrapers and alert rules know them. A
    /// change of how the exposition is written (such as moving to a metrics crate) must keep
    /// this table; a new family adds a row.
    #[test]
    fn families_keep_their_names_types_and_labels() {
        let m = global();
        m.enqueued.get(&["fq", "fk"]).inc();
        m.jobs
            .get(&["fq", "fk"])
            .execution
            .observe(Duration::from_millis(1));
        m.rescues.get(&["retried"]).inc();
        m.http_requests.get(&["GET", "/f", "200"]).inc();
        m.http_duration
            .get(&["GET", "/f"])
            .observe(Duration::from_millis(1));
        m.emails.get(&["ft", "fd"]).sent.inc();
        m.webhook_deliveries.get(&["delivered"]).inc();
        m.cron_fires.get(&["fs"]).inc();
        m.cron_missed.get(&["fs"]).inc();
        m.cron_lag.get(&["fs"]).observe(Duration::from_millis(1));
        let mut out = String::new();
        m.render(&mut out);

        let mut found: Vec<(String, String, String)> = Vec::new();
        let mut current: Option<(String, String)> = None;
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                current = Some((name.to_string(), kind.to_string()));
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let Some((name, kind)) = current.take() else {
                continue;
            };
            // The first sample's label names (without a histogram's `le`).
            let labels = line
                .split_once('{')
                .map(|(_, l)| l.split_once('}').unwrap().0)
                .unwrap_or("")
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                .filter(|k| *k != "le")
                .collect::<Vec<_>>()
                .join(",");
            found.push((name, kind, labels));
        }
        let expected = [
            ("conveyor_jobs_enqueued_total", "counter", "queue,kind"),
            ("conveyor_jobs_completed_total", "counter", "queue,kind"),
            ("conveyor_jobs_failed_total", "counter", "queue,kind"),
            ("conveyor_jobs_retried_total", "counter", "queue,kind"),
            ("conveyor_jobs_dead_total", "counter", "queue,kind"),
            ("conveyor_jobs_cancelled_total", "counter", "queue,kind"),
            ("conveyor_job_execution_seconds", "histogram", "queue,kind"),
            ("conveyor_job_queue_wait_seconds", "histogram", "queue,kind"),
            ("conveyor_lease_rescues_total", "counter", "outcome"),
            (
                "conveyor_http_requests_total",
                "counter",
                "method,route,status",
            ),
            ("conveyor_emails_sent_total", "counter", "transport,domain"),
            (
                "conveyor_emails_failed_total",
                "counter",
                "transport,domain",
            ),
            (
                "conveyor_emails_bounced_total",
                "counter",
                "transport,domain",
            ),
            (
                "conveyor_emails_deferred_total",
                "counter",
                "transport,domain",
            ),
            (
                "conveyor_emails_throttled_total",
                "counter",
                "transport,domain",
            ),
            (
                "conveyor_emails_suppressed_total",
                "counter",
                "transport,domain",
            ),
            (
                "conveyor_http_request_duration_seconds",
                "histogram",
                "method,route",
            ),
            ("conveyor_webhook_deliveries_total", "counter", "outcome"),
            ("conveyor_cron_fires_total", "counter", "schedule"),
            ("conveyor_cron_missed_ticks_total", "counter", "schedule"),
            ("conveyor_cron_fire_lag_seconds", "histogram", "schedule"),
        ];
        let mut want: Vec<_> = expected
            .iter()
            .map(|(n, t, l)| (n.to_string(), t.to_string(), l.to_string()))
            .collect();
        want.sort();
        found.sort();
        assert_eq!(found, want, "{out}");
    }

    #[test]
    fn renders_counters_and_histograms() {
        let m = global();
        let s = m.jobs.get(&["q\"1", "k"]);
        s.completed.inc();
        s.execution.observe(Duration::from_millis(30));
        let again = m.jobs.get(&["q\"1", "k"]);
        assert!(Arc::ptr_eq(&s, &again));
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("conveyor_jobs_completed_total{queue=\"q\\\"1\",kind=\"k\"} 1"),
            "{out}"
        );
        assert!(out.contains(
            "conveyor_job_execution_seconds_bucket{queue=\"q\\\"1\",kind=\"k\",le=\"0.05\"} 1"
        ));
        assert!(
            out.contains("conveyor_job_execution_seconds_count{queue=\"q\\\"1\",kind=\"k\"} 1")
        );
    }
}
