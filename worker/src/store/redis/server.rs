//! The server's settings, checked at connect ([`check_server`]: eviction refused, no
//! persistence warned about), and Redis errors as this crate's ([`store_error`]: a Redis out of
//! memory is [`Error::StoreFull`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

use ::redis::aio::ConnectionManager;

use crate::error::{Error, Result};

/// Reads `INFO <section>` as field → value, or `None` when the server refuses the command
/// (an ACL without `+info`, a renamed command). Only an unreachable server is an error.
pub(super) async fn server_info(
    conn: &ConnectionManager,
    section: &str,
) -> Result<Option<HashMap<String, String>>> {
    let mut conn = conn.clone();
    let text: String = match ::redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
    {
        Ok(text) => text,
        Err(e)
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal() =>
        {
            return Err(e.into());
        }
        Err(_) => return Ok(None),
    };
    Ok(Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect(),
    ))
}

/// `CONFIG GET name`, or `None` where the server does not allow it (managed Redis often
/// disables or renames CONFIG).
pub(super) async fn config_get(conn: &ConnectionManager, name: &str) -> Option<String> {
    let mut conn = conn.clone();
    let pairs: Vec<String> = ::redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(&mut conn)
        .await
        .ok()?;
    pairs.get(1).cloned()
}

/// Checks the settings a job store depends on; `server` (the redacted URL) names the server
/// in messages.
///
/// - A `maxmemory-policy` other than `noeviction` lets Redis delete keys when memory runs
///   short: jobs disappear, an idempotency key is taken again by a second job, index sets
///   point at deleted jobs, API keys vanish, all without an error. Such a server is refused
///   (read from `INFO memory`, which managed Redis allows where it disables CONFIG), unless
///   the URL says `allow_eviction=true`; then it is a warning.
/// - Without AOF and without RDB snapshots a restart brings the server back empty: a warning.
///
/// Returns the warnings.
pub async fn check_server(
    conn: &ConnectionManager,
    server: &str,
    allow_eviction: bool,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let memory = server_info(conn, "memory").await?;
    let policy = match memory.as_ref().and_then(|m| m.get("maxmemory_policy")) {
        Some(p) => Some(p.clone()),
        None => config_get(conn, "maxmemory-policy").await,
    };
    match policy.as_deref() {
        Some("noeviction") => {}
        Some(policy) => {
            let problem = eviction_problem(server, policy);
            if !allow_eviction {
                return Err(Error::Unsupported(format!(
                    "{problem} Set `maxmemory-policy noeviction` (`CONFIG SET maxmemory-policy noeviction` and `CONFIG REWRITE`, in redis.conf, or in your provider's parameter group), or, if the risk is understood, add `allow_eviction=true` to the store URL"
                )));
            }
            warnings.push(format!("{problem} Starting anyway: the store URL says allow_eviction=true."));
        }
        None => warnings.push(format!(
            "could not read the maxmemory-policy of Redis at {server}; it must be noeviction, or Redis may delete jobs when memory runs short"
        )),
    }
    let persistence = server_info(conn, "persistence").await?;
    let aof = persistence.and_then(|p| p.get("aof_enabled").map(|v| v == "1"));
    let save = config_get(conn, "save").await;
    warnings.extend(persistence_warnings(server, aof, save.as_deref()));
    Ok(warnings)
}

pub(super) fn eviction_problem(server: &str, policy: &str) -> String {
    format!(
        "Redis at {server} has maxmemory-policy `{policy}`: when memory runs short it deletes keys, and Conveyor's jobs, idempotency keys, indexes and API keys are keys, so jobs are lost without an error."
    )
}

/// Why a restart of the server would lose the store: a warning unless the append-only file
/// (`aof`, from `INFO persistence`) or RDB snapshots (`save`, from `CONFIG GET save`) are on.
/// `None` is a setting the server would not tell (managed Redis often refuses `CONFIG`).
pub fn persistence_warnings(server: &str, aof: Option<bool>, save: Option<&str>) -> Vec<String> {
    const FIX: &str = "turn on the append-only file (`appendonly yes`, `appendfsync everysec`) or snapshots (`save 60 1000`) in redis.conf or your provider's settings";
    let snapshots = save.map(|s| !s.trim().is_empty());
    match (aof, snapshots) {
        (Some(true), _) | (_, Some(true)) => Vec::new(),
        (Some(false), Some(false)) => vec![format!(
            "Redis at {server} has neither the append-only file nor RDB snapshots on: if it restarts, every job, schedule and API key is gone. For a job store, {FIX}"
        )],
        _ => vec![format!(
            "could not confirm that Redis at {server} persists its data (it did not tell whether the append-only file or snapshots are on): unless they or your provider's persistence are on, a restart loses every job, schedule and API key. For a job store, {FIX}"
        )],
    }
}

/// Logs each warning once per process, however many stores connect.
pub(super) fn log_once(warnings: &[String]) {
    static LOGGED: LazyLock<std::sync::Mutex<BTreeSet<String>>> = LazyLock::new(Default::default);
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    for w in warnings {
        if logged.insert(w.clone()) {
            tracing::warn!("{w}");
        }
    }
}

/// What Redis answers when it refuses a write at `maxmemory` (policy `noeviction`).
pub(super) const OOM_REPLY: &str = "OOM command not allowed";

/// A Redis error as this crate's: an out-of-memory refusal, alone or inside a pipeline, a
/// transaction or a script, becomes [`Error::StoreFull`] saying what to do; anything else is
/// [`Error::Redis`].
pub(crate) fn store_error(e: ::redis::RedisError) -> Error {
    if e.code() == Some("OOM") || e.to_string().contains(OOM_REPLY) {
        Error::StoreFull(out_of_memory())
    } else {
        Error::Redis(e)
    }
}

/// The message of [`Error::StoreFull`] on Redis.
pub(super) fn out_of_memory() -> String {
    "Redis is out of memory: it reached `maxmemory` and refuses writes (reads still work). Give it room: raise `maxmemory` (`CONFIG SET maxmemory <bytes>`, redis.conf, or your provider's settings), delete dead jobs (`conveyor dead purge --all`), or shorten `maintenance.pruner.retention` so finished jobs are deleted sooner".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_out_of_memory_refusal_is_a_full_store() {
        let oom = ::redis::RedisError::from((
            ::redis::ErrorKind::Extension,
            "pipeline",
            "OOM command not allowed when used memory > 'maxmemory'.".to_string(),
        ));
        assert!(matches!(store_error(oom), Error::StoreFull(m) if m.contains("maxmemory")));
        let other = ::redis::RedisError::from((::redis::ErrorKind::Io, "connection reset"));
        assert!(matches!(store_error(other), Error::Redis(_)));
    }

    #[test]
    fn persistence_warns_only_when_nothing_persists() {
        assert!(persistence_warnings("r", Some(true), Some("")).is_empty());
        assert!(persistence_warnings("r", Some(true), None).is_empty());
        assert!(persistence_warnings("r", Some(false), Some("3600 1 300 100")).is_empty());
        assert!(persistence_warnings("r", None, Some("60 1")).is_empty());
        assert!(persistence_warnings("r", Some(false), Some(""))[0].contains("neither"));
        assert!(persistence_warnings("r", Some(false), None)[0].contains("could not confirm"));
        assert!(persistence_warnings("r", None, None)[0].contains("could not confirm"));
    }
}
