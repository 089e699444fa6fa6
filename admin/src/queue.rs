//! Queues: the overview (counts, age, paused, throughput, served) and pause/resume.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use conveyor_worker::job::check_name;
use conveyor_worker::runtime::pause::{self, QueueSettings};
use conveyor_worker::store::QueueStats;
use conveyor_worker::store::meta::{Put, list_all};
use serde::Serialize;
use serde_json::json;

use crate::serving::Serving;
use crate::{Actor, Admin, Result};

/// One queue as operators see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueOverview {
    /// Name, counts by state, the oldest ready job's age.
    #[serde(flatten)]
    pub stats: QueueStats,
    /// Workers fetch nothing from a paused queue (it still accepts jobs).
    pub paused: bool,
    /// Attempts finished per second between the live workers' last two heartbeats, summed.
    pub throughput_per_second: f64,
    /// Jobs wait in it and no live worker fetches from it.
    pub unserved: bool,
}

impl Admin {
    /// Every queue that has jobs or settings, by name.
    pub async fn queues(&self) -> Result<Vec<QueueOverview>> {
        let stats = self.store.queue_stats().await?;
        let mut settings: HashMap<String, QueueSettings> = HashMap::new();
        for r in list_all(self.store.as_ref(), pause::COLLECTION).await? {
            match r.decode::<QueueSettings>() {
                Ok(s) => {
                    settings.insert(r.key, s);
                }
                Err(e) => {
                    tracing::warn!(key = %r.key, error = %e, "skipping unreadable queue settings")
                }
            }
        }
        let serving = Serving::read(self.store.as_ref()).await?;
        let mut throughput: HashMap<&str, f64> = HashMap::new();
        for w in &serving.workers {
            for q in &w.queues {
                *throughput.entry(q.name.as_str()).or_default() += q.finished_per_second;
            }
        }
        let mut all: BTreeMap<String, QueueStats> =
            stats.into_iter().map(|s| (s.queue.clone(), s)).collect();
        for name in settings.keys() {
            all.entry(name.clone()).or_insert_with(|| QueueStats {
                queue: name.clone(),
                ..QueueStats::default()
            });
        }
        Ok(all
            .into_values()
            .map(|stats| {
                let waiting = stats.counts.iter().any(|(s, n)| s.is_waiting() && *n > 0);
                QueueOverview {
                    paused: settings.get(&stats.queue).is_some_and(|q| q.paused),
                    throughput_per_second: throughput
                        .get(stats.queue.as_str())
                        .copied()
                        .unwrap_or(0.0),
                    unserved: waiting && !serving.serves_queue(&stats.queue),
                    stats,
                }
            })
            .collect())
    }

    /// Pauses (`paused`) or resumes a queue. Audited as `queue.pause` / `queue.resume`.
    pub async fn set_queue_paused(
        &self,
        actor: &Actor,
        name: &str,
        paused: bool,
    ) -> Result<QueueSettings> {
        check_name("queue", name)?;
        let settings = QueueSettings {
            paused,
            changed_at: Some(Utc::now()),
            changed_by: Some(actor.name.clone()),
        };
        let value = serde_json::to_value(&settings).map_err(conveyor_worker::Error::from)?;
        self.store
            .meta_put(Put::new(pause::COLLECTION, name, &value))
            .await?;
        let action = if paused {
            "queue.pause"
        } else {
            "queue.resume"
        };
        self.audit(actor, action, json!({ "queue": name }), 1)
            .await?;
        Ok(settings)
    }
}
