//! The key layout (see the table in the parent module's doc): [`Keys`] names every key under
//! a prefix, and [`LAYOUT_VERSION`] in `P:version` says which layout the data has —
//! `migrate` brings it up to date, `ping` refuses data of another layout.

use super::RedisStore;
use crate::error::{Error, Result};
use crate::job::JobState;

/// Data layout version kept in `P:version`; `migrate` writes it, `ping` checks it.
pub(super) const LAYOUT_VERSION: i64 = 2;

/// Key names under one prefix.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    /// The hash-tagged base of every key of `queue`.
    pub(super) fn queue(&self, queue: &str) -> String {
        format!("{{{}:{queue}}}", self.prefix)
    }
    /// The set that holds every job of `queue` in `state`: `s:<state>`, or the lease set for
    /// running jobs.
    pub(super) fn state_set(&self, queue: &str, state: JobState) -> String {
        match state {
            JobState::Running => format!("{}:leases", self.queue(queue)),
            _ => format!("{}:s:{}", self.queue(queue), state.as_str()),
        }
    }
    pub(super) fn index(&self) -> String {
        format!("{}:index", self.prefix)
    }
    pub(super) fn queues(&self) -> String {
        format!("{}:queues", self.prefix)
    }
    pub(super) fn version(&self) -> String {
        format!("{}:version", self.prefix)
    }
    pub(super) fn idempotency(&self, key: &str) -> String {
        format!("{}:key:{key}", self.prefix)
    }
    pub(super) fn jobs_channel(&self) -> String {
        format!("{}:jobs", self.prefix)
    }
    pub(super) fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }
    pub(super) fn events_channel(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

impl RedisStore {
    pub(super) async fn migrate_layout(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let found: Option<i64> = ::redis::cmd("GET")
            .arg(self.keys.version())
            .query_async(&mut conn)
            .await?;
        if found.is_some_and(|v| v > LAYOUT_VERSION) {
            return Err(Error::Unsupported(format!(
                "the data under prefix `{}` has layout {}, newer than this binary's {LAYOUT_VERSION}; upgrade conveyor",
                self.keys.prefix,
                found.unwrap_or_default()
            )));
        }
        if found == Some(1) {
            // Layout 2 lists running jobs from the lease set, which always held them too: the
            // old per-queue set of running jobs goes. (It also keeps attempt histories apart
            // from the hash; readers still take the histories layout 1 kept in the hash.)
            let mut pipe = ::redis::pipe();
            for queue in self.queues().await? {
                pipe.cmd("DEL")
                    .arg(format!("{}:s:running", self.keys.queue(&queue)))
                    .ignore();
            }
            self.run::<()>(&pipe).await?;
        }
        // Nothing is written when the layout is current, so every process can start (and
        // read) on a Redis that is out of memory and refuses writes. Loading scripts is not
        // a write Redis refuses.
        if found != Some(LAYOUT_VERSION) {
            ::redis::cmd("SET")
                .arg(self.keys.version())
                .arg(LAYOUT_VERSION)
                .query_async::<()>(&mut conn)
                .await?;
        }
        self.load_scripts().await
    }

    pub(super) async fn check_layout(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let found: Option<i64> = ::redis::cmd("GET")
            .arg(self.keys.version())
            .query_async(&mut conn)
            .await?;
        if found != Some(LAYOUT_VERSION) {
            return Err(Error::Unsupported(format!(
                "prefix `{}` has data layout {}, this binary needs {LAYOUT_VERSION}; run `conveyor migrate`",
                self.keys.prefix,
                found.map_or("none".to_string(), |v| v.to_string())
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_share_one_hash_tag() {
        let keys = Keys {
            prefix: "conveyor".into(),
        };
        assert_eq!(keys.queue("default"), "{conveyor:default}");
        assert_eq!(keys.idempotency("order-1"), "conveyor:key:order-1");
    }
}
