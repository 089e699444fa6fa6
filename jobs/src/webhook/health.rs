//! Endpoint health: success rate and latency over the last hour and day, and the circuit.
//!
//! Each worker counts its deliveries per endpoint and minute in memory (count, successes,
//! latency histogram) and merges them into `webhook_health` records (`{endpoint}:{minute}`,
//! kept 25 hours) every `webhooks.health_flush` — a handful of writes per endpoint and
//! flush instead of one per delivery. A health query adds up the minutes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_worker::store::meta::{Expect, MetaQuery, Put};
use serde::{Deserialize, Serialize};

use super::model::{CircuitState, HEALTH};
use super::{Result, Webhooks};

/// Upper bounds (ms) of the latency histogram buckets; the last bucket is everything above.
const BUCKETS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 30_000, 60_000,
];

/// Counters of one endpoint-minute.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MinuteStats {
    /// Attempts.
    pub attempts: u64,
    /// Delivered.
    pub successes: u64,
    /// Sum of latencies in ms.
    pub latency_sum_ms: u64,
    /// Attempts per latency bucket (see `BUCKETS_MS`, plus one overflow bucket).
    pub buckets: Vec<u64>,
}

impl MinuteStats {
    fn add(&mut self, other: &MinuteStats) {
        self.attempts += other.attempts;
        self.successes += other.successes;
        self.latency_sum_ms += other.latency_sum_ms;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    fn percentile(&self, p: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(BUCKETS_MS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }
}

/// In-memory counters of this process, waiting to be flushed.
#[derive(Debug)]
pub(crate) struct Recorder {
    pending: Mutex<HashMap<(String, i64), MinuteStats>>,
    last_flush: Mutex<Instant>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            last_flush: Mutex::new(Instant::now()),
        }
    }
}

impl Recorder {
    pub(crate) fn record(&self, endpoint: &str, at: DateTime<Utc>, ok: bool, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS_MS.len());
        let mut pending = self.pending.lock().expect("not poisoned");
        let s = pending
            .entry((endpoint.to_string(), at.timestamp() / 60))
            .or_default();
        s.attempts += 1;
        s.successes += u64::from(ok);
        s.latency_sum_ms = s.latency_sum_ms.saturating_add(ms);
        if s.buckets.is_empty() {
            s.buckets = vec![0; BUCKETS_MS.len() + 1];
        }
        s.buckets[bucket] += 1;
    }

    /// True (and the clock reset) if a flush is due.
    pub(crate) fn flush_due(&self, every: Duration) -> bool {
        let mut last = self.last_flush.lock().expect("not poisoned");
        if last.elapsed() >= every {
            *last = Instant::now();
            true
        } else {
            false
        }
    }

    fn take(&self) -> HashMap<(String, i64), MinuteStats> {
        std::mem::take(&mut *self.pending.lock().expect("not poisoned"))
    }

    fn put_back(&self, key: (String, i64), stats: MinuteStats) {
        self.pending
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_default()
            .add(&stats);
    }
}

/// Health over one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Window {
    /// Attempts in the window.
    pub attempts: u64,
    /// Delivered.
    pub successes: u64,
    /// successes / attempts (`None` without attempts).
    pub success_rate: Option<f64>,
    /// Mean latency in ms.
    pub latency_avg_ms: Option<f64>,
    /// Median latency, as the upper bound of its histogram bucket.
    pub latency_p50_ms: Option<u64>,
    /// 99th percentile latency, likewise.
    pub latency_p99_ms: Option<u64>,
}

impl From<&MinuteStats> for Window {
    fn from(s: &MinuteStats) -> Self {
        Window {
            attempts: s.attempts,
            successes: s.successes,
            success_rate: (s.attempts > 0).then(|| s.successes as f64 / s.attempts as f64),
            latency_avg_ms: (s.attempts > 0).then(|| s.latency_sum_ms as f64 / s.attempts as f64),
            latency_p50_ms: s.percentile(0.5),
            latency_p99_ms: s.percentile(0.99),
        }
    }
}

/// An endpoint's health.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// The endpoint.
    pub endpoint_id: String,
    /// Enabled.
    pub enabled: bool,
    /// Circuit state now.
    pub circuit: CircuitState,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Failing since (no success after it).
    pub failing_since: Option<DateTime<Utc>>,
    /// The last hour.
    pub last_hour: Window,
    /// The last 24 hours.
    pub last_day: Window,
}

impl Webhooks {
    /// Writes this process's pending health counters to the store.
    pub async fn flush_health(&self) -> Result<()> {
        let ttl = Duration::from_secs(25 * 3600);
        for ((endpoint, minute), stats) in self.health.take() {
            let key = format!("{endpoint}:{minute:012}");
            let mut merged = false;
            for _ in 0..8 {
                let record = self.store.meta_get(HEALTH, &key).await?;
                let (expect, mut total) = match &record {
                    Some(r) => (Expect::Version(r.version), r.decode::<MinuteStats>()?),
                    None => (Expect::Absent, MinuteStats::default()),
                };
                total.add(&stats);
                let value = serde_json::to_value(&total)?;
                match self
                    .store
                    .meta_put(Put::new(HEALTH, &key, &value).expect(expect).ttl(ttl))
                    .await
                {
                    Ok(_) => {
                        merged = true;
                        break;
                    }
                    Err(conveyor_worker::Error::Conflict(_)) => continue,
                    Err(e) => {
                        self.health
                            .put_back((endpoint.clone(), minute), stats.clone());
                        return Err(e.into());
                    }
                }
            }
            if !merged {
                self.health.put_back((endpoint, minute), stats);
            }
        }
        Ok(())
    }

    /// Success rate and latency over the last hour and day, and the circuit state.
    pub async fn health(&self, endpoint_id: &str) -> Result<Health> {
        let ep = self.endpoint(endpoint_id).await?;
        let now = Utc::now();
        let circuit = self.circuit(endpoint_id).await?;
        let this_minute = now.timestamp() / 60;
        let mut hour = MinuteStats::default();
        let mut day = MinuteStats::default();
        let mut after = Some(format!("{endpoint_id}:{:012}", this_minute - 24 * 60));
        loop {
            let page = self
                .store
                .meta_list(
                    HEALTH,
                    &MetaQuery {
                        prefix: Some(format!("{endpoint_id}:")),
                        after: after.clone(),
                        limit: 1000,
                        descending: false,
                    },
                )
                .await?;
            for r in &page {
                let minute: i64 = r
                    .key
                    .rsplit(':')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0);
                let s: MinuteStats = r.decode()?;
                day.add(&s);
                if minute > this_minute - 60 {
                    hour.add(&s);
                }
            }
            if page.len() < 1000 {
                break;
            }
            after = page.last().map(|r| r.key.clone());
        }
        Ok(Health {
            endpoint_id: endpoint_id.to_string(),
            enabled: ep.enabled,
            circuit: circuit.state(now),
            consecutive_failures: circuit.consecutive_failures,
            failing_since: circuit.failing_since,
            last_hour: Window::from(&hour),
            last_day: Window::from(&day),
        })
    }
}
