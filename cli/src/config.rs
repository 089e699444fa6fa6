//! Configuration: built-in defaults, then a TOML file, then `CONVEYOR_*` environment
//! variables, then command-line flags — each layer overriding the one before. Validated once
//! at start, so a typo stops the process with the key's name instead of surprising it later.
//!
//! Environment variables name a key path with `__` between levels:
//! `CONVEYOR_DATABASE__URL=postgres://…`, `CONVEYOR_WORKER__LEASE=1m`,
//! `CONVEYOR_SERVE__LISTEN=0.0.0.0:8080`. A variable with `__` must name a key, and a key
//! written with one `_` (`CONVEYOR_DATABASE_URL`) is refused too, naming the spelling meant;
//! others (`CONVEYOR_BIN`, `CONVEYOR_TEST_PG_URL`, Kubernetes' `CONVEYOR_SERVICE_HOST`) are
//! left alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use conveyor_api::ApiConfig;
use conveyor_scheduler::MaintenanceConfig;
use conveyor_scheduler::schedule::{Schedule, ScheduleSpec};
use conveyor_worker::runtime::{QueueConfig, WorkerConfig};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::cli::Role;

/// The sections a config file (and `CONVEYOR_<SECTION>__…`) may set.
const SECTIONS: [&str; 14] = [
    "database",
    "serve",
    "api",
    "worker",
    "maintenance",
    "log",
    "webhooks",
    "secrets",
    "http_requests",
    "http_targets",
    "backup",
    "email",
    "stats",
    "analytics",
];

/// Everything `conveyor` reads from its config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where jobs are kept.
    pub database: DatabaseConfig,
    /// The `serve` process.
    pub serve: ServeConfig,
    /// The HTTP API: limits, rate limits, metrics access, CORS.
    pub api: ApiConfig,
    /// The worker runtime.
    pub worker: WorkerConfig,
    /// Promoter, rescuer, pruner (including retention) and the cron service.
    pub maintenance: MaintenanceConfig,
    /// Logging.
    pub log: LogConfig,
    /// Cron schedules (`[[schedules]]`).
    pub schedules: Vec<ScheduleSpec>,
    /// Webhook delivery: queue, SSRF allow-list, retries, timeouts, circuit breaker.
    pub webhooks: conveyor_jobs::webhook::WebhookConfig,
    /// The keys that encrypt credentials kept in the store (webhook signing secrets).
    pub secrets: SecretsConfig,
    /// `http.request` jobs: raw URLs allowed or not, SSRF allow-list, timeouts, statuses.
    pub http_requests: conveyor_jobs::http_target::HttpRequestsConfig,
    /// The named targets `http.request` jobs may call (`[http_targets.<name>]`).
    pub http_targets: std::collections::BTreeMap<String, conveyor_jobs::http_target::HttpTarget>,
    /// Backups: destinations, the application's databases, compression, part size.
    pub backup: conveyor_backup::BackupConfig,
    /// `email.send`: the SMTP transports (`[email.transports.<name>]`), pools, limits.
    pub email: conveyor_jobs::email::EmailConfig,
    /// The platform history (`stats.rollup`): lateness, how long each resolution is kept.
    pub stats: conveyor_analytics::StatsConfig,
    /// The application's rollups (`[analytics.rollups.<name>]`): source query, target
    /// table, window, lateness, schedule.
    pub analytics: conveyor_analytics::application::AnalyticsConfig,
}

/// `[secrets]`: the keys credentials kept in the store are encrypted with. The first key
/// (of `keys`, then of `key_file`) encrypts; every key decrypts. With neither set, a SQLite
/// store uses (and on first use creates) the key file beside its database file; Postgres and
/// Redis need one set before a webhook endpoint can be created. See docs/operations.md,
/// Secrets at rest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// Keys, 32 random bytes in base64 each (`conveyor secrets generate-key`), current first.
    /// From the environment: `CONVEYOR_SECRETS__KEYS=key1,key2`.
    #[serde(deserialize_with = "key_list")]
    pub keys: Vec<conveyor_worker::keyring::Key>,
    /// A file with one key per line, current first (`#` starts a comment); read after `keys`.
    pub key_file: Option<PathBuf>,
}

/// A list of keys, or one string of comma-separated keys (as an environment variable gives).
fn key_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<conveyor_worker::keyring::Key>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Keys {
        One(String),
        Many(Vec<String>),
    }
    let texts = match Keys::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a list of keys, or one string of keys separated by commas",
        )
    })? {
        Keys::One(s) => s.split(',').map(str::to_string).collect(),
        Keys::Many(v) => v,
    };
    texts
        .iter()
        .filter(|t| !t.trim().is_empty())
        .enumerate()
        .map(|(i, t)| {
            conveyor_worker::keyring::Key::parse(t)
                .map_err(|e| serde::de::Error::custom(format!("key {}: {e}", i + 1)))
        })
        .collect()
}

/// `[database]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://conveyor.db` (the default: a file in the working directory),
    /// `sqlite:///abs/path.db`, `postgres://user:pass@host:5432/db` or
    /// `redis://host:6379/0?prefix=conveyor`.
    pub url: String,
    /// Connection pool size.
    pub max_connections: u32,
    /// Postgres behind a connection pooler such as PgBouncer: `"none"` (a direct connection),
    /// `"session"` or `"transaction"` (its `pool_mode`). See docs/operations.md.
    pub pooler: conveyor_worker::store::Pooler,
    /// Postgres: a direct URL (bypassing the pooler) for LISTEN wake-ups. Without it, a
    /// transaction-mode pooler means polling.
    pub listen_url: Option<String>,
    /// Postgres: `statement_timeout` of Conveyor's own connections, whatever the server's
    /// default is (`0s`: none). See docs/operations.md, Server settings.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: std::time::Duration,
    /// Postgres: `lock_timeout` of Conveyor's own connections (`0s`: wait, bounded by
    /// `statement_timeout`).
    #[serde(with = "humantime_serde")]
    pub lock_timeout: std::time::Duration,
    /// Postgres: `idle_in_transaction_session_timeout` of Conveyor's own connections.
    #[serde(with = "humantime_serde")]
    pub idle_in_transaction_timeout: std::time::Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        let session = conveyor_worker::store::PgSessionSettings::default();
        Self {
            url: "sqlite://conveyor.db".into(),
            max_connections: 10,
            pooler: conveyor_worker::store::Pooler::None,
            listen_url: None,
            statement_timeout: session.statement_timeout,
            lock_timeout: session.lock_timeout,
            idle_in_transaction_timeout: session.idle_in_transaction_timeout,
        }
    }
}

impl DatabaseConfig {
    /// The per-connection settings for a Postgres store.
    pub fn pg_session(&self) -> conveyor_worker::store::PgSessionSettings {
        conveyor_worker::store::PgSessionSettings {
            statement_timeout: self.statement_timeout,
            lock_timeout: self.lock_timeout,
            idle_in_transaction_timeout: self.idle_in_transaction_timeout,
        }
    }
}

/// `[serve]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Roles this process runs.
    pub roles: Vec<Role>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            roles: vec![Role::Api, Role::Worker, Role::Scheduler],
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `conveyor_worker=debug`); `RUST_LOG` wins if set.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A config problem: which key or file, what is wrong, how to fix it. Exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("config error: {0}")]
pub struct ConfigError(pub String);

/// Where the config file comes from: `--config`, else `./conveyor.toml` if present.
fn config_file(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    match explicit {
        Some(path) if !path.is_file() => Err(ConfigError(format!(
            "--config {}: no such file (see config/conveyor.example.toml for a starting point)",
            path.display()
        ))),
        Some(path) => Ok(Some(path.to_path_buf())),
        None => {
            let local = PathBuf::from("conveyor.toml");
            Ok(local.is_file().then_some(local))
        }
    }
}

/// Loads the layered config and validates it. `env` is the process environment (a parameter
/// so tests can pass their own).
pub fn load(
    explicit_file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = config_file(explicit_file)? {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(env_provider(env)?);
    let config: Config = figment
        .extract()
        .map_err(|e| ConfigError(describe_figment_error(e)))?;
    config.validate()?;
    Ok(config)
}

/// The environment variables that set config keys, as a figment provider whose errors name
/// the variable (`CONVEYOR_WORKER__FETCH_BATCH`) rather than a key path or our source code.
struct EnvVars {
    dict: figment::value::Dict,
    /// `worker.fetch_batch` -> `CONVEYOR_WORKER__FETCH_BATCH`.
    names: std::collections::HashMap<String, String>,
}

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        let names = self.names.clone();
        figment::Metadata::named("environment variable").interpolater(move |_, keys| {
            let key = keys.join(".");
            names
                .get(&key)
                .cloned()
                .unwrap_or_else(|| format!("CONVEYOR_{}", keys.join("__").to_ascii_uppercase()))
        })
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.dict.clone()))
    }
}

/// Whether a `CONVEYOR_*` variable is meant as config: its name has the `__` level separator
/// (`CONVEYOR_DATABSE__URL`), or is a key with one underscore too few after the section
/// (`CONVEYOR_DATABASE_URL`). Other `CONVEYOR_*` names are not ours to refuse: `CONVEYOR_BIN`,
/// the test harness's `CONVEYOR_TEST_*`, the benchmark's `CONVEYOR_BENCH_*`, a client's
/// `CONVEYOR_API_KEY`, and the `CONVEYOR_SERVICE_HOST`/`CONVEYOR_PORT_…` Kubernetes and Docker
/// set for a service named `conveyor`.
fn is_config_variable(rest: &str, known: &[Vec<String>]) -> bool {
    let lower = rest.to_ascii_lowercase();
    lower.contains("__")
        || SECTIONS.iter().any(|section| {
            lower
                .strip_prefix(&format!("{section}_"))
                .is_some_and(|key| known.contains(&vec![section.to_string(), key.to_string()]))
        })
}

/// The config keys whose default is `None`.
const OPTIONAL_KEYS: [&str; 8] = [
    "database.listen_url",
    "backup.scratch_dir",
    "api.metrics.listen",
    "secrets.key_file",
    "http_requests.signing_secret",
    "email.default_transport",
    "email.message_id_domain",
    "email.public_url",
];

/// Whether `path` is a key of a named HTTP target (`http_targets.<name>.<key>`, or a header
/// `http_targets.<name>.headers.<header>`), of a named email transport
/// (`email.transports.<name>.<key>`) or DKIM key (`email.dkim.<name>.<key>`), or of a backup destination or source: these names are
/// the operator's, so these keys are not among the defaults.
fn is_target_key(path: &[String]) -> bool {
    match path {
        [section, _, key] => {
            section == "http_targets"
                && conveyor_jobs::http_target::HttpTarget::FIELDS.contains(&key.as_str())
        }
        [section, map, _, _] if section == "backup" => is_backup_map(map),
        [section, _, headers, _] if section == "http_targets" => headers == "headers",
        [section, transports, _, key] if section == "email" && transports == "transports" => {
            conveyor_jobs::email::Transport::FIELDS.contains(&key.as_str())
        }
        [section, dkim, _, key] if section == "email" && dkim == "dkim" => {
            conveyor_jobs::email::dkim::DkimKey::FIELDS.contains(&key.as_str())
        }
        [section, throttles, _, key] if section == "email" && throttles == "throttles" => {
            conveyor_jobs::email::throttle::Throttle::FIELDS.contains(&key.as_str())
        }
        _ => false,
    }
}

/// `backup.destinations.<name>.<key>` and `backup.sources.<name>.<key>` name the operator's
/// destinations and sources; their keys are checked when the section is read.
fn is_backup_map(path_part: &str) -> bool {
    matches!(path_part, "destinations" | "sources")
}

/// Every key path the config has (`["worker", "fetch_batch"]`), leaves and sections alike.
fn known_keys() -> Vec<Vec<String>> {
    fn walk(dict: &figment::value::Dict, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for (key, value) in dict {
            let mut path = prefix.to_vec();
            path.push(key.clone());
            if let figment::value::Value::Dict(_, inner) = value {
                walk(inner, &path, out);
            }
            out.push(path);
        }
    }
    let mut out = Vec::new();
    if let Ok(figment::value::Value::Dict(_, root)) =
        figment::value::Value::serialize(Config::default())
    {
        walk(&root, &[], &mut out);
    }
    // Keys whose default is "unset" serialize to nothing; name them here (a unit test checks
    // each still is a key).
    for optional in OPTIONAL_KEYS {
        let path: Vec<String> = optional.split('.').map(str::to_string).collect();
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// `CONVEYOR_SECTION__KEY=value` pairs as a provider; values are parsed like TOML scalars. A
/// variable meant as config that names no key is an error naming it, with the closest key.
fn env_provider(env: impl IntoIterator<Item = (String, String)>) -> Result<EnvVars, ConfigError> {
    let known = known_keys();
    let mut root = figment::value::Dict::new();
    let mut names = std::collections::HashMap::new();
    let mut unknown = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("CONVEYOR_") else {
            continue;
        };
        if !is_config_variable(rest, &known) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.len() < 2 || !(known.contains(&path) || is_target_key(&path)) {
            unknown.push(unknown_variable(&name, rest, &known));
            continue;
        }
        let parsed: figment::value::Value = value
            .parse()
            .unwrap_or_else(|_| figment::value::Value::from(value.clone()));
        names.insert(path.join("."), name.clone());
        insert_path(&mut root, &path, parsed);
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(ConfigError(format!(
            "{}; unset it, or see config/conveyor.example.toml for every key (CONVEYOR_<SECTION>__<KEY>, `__` between levels)",
            unknown.join("; ")
        )));
    }
    Ok(EnvVars { dict: root, names })
}

/// "environment variable CONVEYOR_DATABSE__URL names no config key (did you mean
/// CONVEYOR_DATABASE__URL?)"
fn unknown_variable(name: &str, rest: &str, known: &[Vec<String>]) -> String {
    let wanted = rest.to_ascii_lowercase();
    let closest = known
        .iter()
        .filter(|path| path.len() >= 2)
        .map(|path| path.join("__"))
        .map(|candidate| (strsim::levenshtein(&wanted, &candidate), candidate))
        .min();
    let hint = match closest {
        Some((distance, candidate)) if distance <= 3 => format!(
            " (did you mean CONVEYOR_{}?)",
            candidate.to_ascii_uppercase()
        ),
        _ => String::new(),
    };
    format!("environment variable {name} names no config key{hint}")
}

fn insert_path(dict: &mut figment::value::Dict, path: &[String], value: figment::value::Value) {
    if path.len() == 1 {
        dict.insert(path[0].clone(), value);
        return;
    }
    let entry = dict
        .entry(path[0].clone())
        .or_insert_with(|| figment::value::Value::from(figment::value::Dict::new()));
    if let figment::value::Value::Dict(_, inner) = entry {
        insert_path(inner, &path[1..], value);
    } else {
        let mut inner = figment::value::Dict::new();
        insert_path(&mut inner, &path[1..], value);
        *entry = figment::value::Value::from(inner);
    }
}

fn describe_figment_error(e: figment::Error) -> String {
    let mut out = Vec::new();
    for err in e {
        let key = if err.path.is_empty() {
            String::from("(top level)")
        } else {
            err.path.join(".")
        };
        // Name the file or variable the value came from; never where in our code a default
        // was written (figment's source for `Serialized` values).
        let source = match &err.metadata {
            Some(meta) if meta.name == "environment variable" => {
                let keys: Vec<&str> = err.path.iter().map(String::as_str).collect();
                format!(
                    " (from environment variable {})",
                    meta.interpolate(&err.profile.clone().unwrap_or_default(), &keys)
                )
            }
            Some(meta) => match &meta.source {
                Some(figment::Source::File(path)) => format!(" (from {})", path.display()),
                _ => String::new(),
            },
            None => String::new(),
        };
        out.push(format!("`{key}`{source}: {}", err.kind));
    }
    out.join("; ")
}

impl Config {
    /// Checks what serde cannot: URL scheme, worker timings, queue names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let retention = &self.maintenance.pruner.retention;
        let shortest = retention
            .completed
            .min(retention.cancelled)
            .min(retention.dead);
        if self.stats.enabled {
            self.stats.check(shortest).map_err(ConfigError)?;
        }
        self.analytics
            .check(&|name| crate::analytics::source_url(self, name))
            .map_err(ConfigError)?;
        for spec in crate::analytics::schedules(&self.analytics) {
            let rollup = spec.name.trim_start_matches("analytics.");
            spec.compile()
                .map_err(|e| ConfigError(format!("`analytics.rollups.{rollup}.schedule`: {e}")))?;
        }
        let url = &self.database.url;
        let known = url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("redis://")
            || url.starts_with("rediss://");
        if !known {
            return Err(ConfigError(format!(
                "`database.url` = `{}`: unknown scheme; use sqlite://conveyor.db, postgres://user@host:5432/db or redis://host:6379/0",
                conveyor_worker::store::redact_url(url)
            )));
        }
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if self.database.pooler != conveyor_worker::store::Pooler::None && !postgres {
            return Err(ConfigError(format!(
                "`database.pooler` = \"{}\" applies to Postgres only, but `database.url` is not a postgres:// URL; remove it",
                self.database.pooler
            )));
        }
        if let Some(listen) = &self.database.listen_url
            && !(postgres
                && (listen.starts_with("postgres://") || listen.starts_with("postgresql://")))
        {
            return Err(ConfigError(format!(
                "`database.listen_url` = `{}`: must be a postgres:// URL of the same database, reached directly rather than through the pooler, and `database.url` must be Postgres too",
                conveyor_worker::store::redact_url(listen)
            )));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError(
                "`database.max_connections` must be at least 1".into(),
            ));
        }
        if self.serve.roles.is_empty() {
            return Err(ConfigError(
                "`serve.roles` is empty; name at least one of api, worker, scheduler".into(),
            ));
        }
        self.worker
            .validate()
            .map_err(|e| ConfigError(e.to_string()))?;
        self.api.validate().map_err(ConfigError)?;
        self.compiled_schedules()?;
        self.webhooks.validate().map_err(ConfigError)?;
        self.http().validate().map_err(ConfigError)?;
        self.backup
            .validate()
            .map_err(|e| ConfigError(e.to_string()))?;
        self.email.validate().map_err(ConfigError)?;
        Ok(())
    }

    /// The settings of `http.request`: `[http_requests]` and `[http_targets.*]`.
    pub fn http(&self) -> conveyor_jobs::http_target::HttpConfig {
        conveyor_jobs::http_target::HttpConfig {
            requests: self.http_requests.clone(),
            targets: self.http_targets.clone(),
        }
    }

    /// The `[[schedules]]`, validated: every field, and names unique.
    pub fn compiled_schedules(&self) -> Result<Vec<Schedule>, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(self.schedules.len());
        for (i, spec) in self.schedules.iter().enumerate() {
            if !seen.insert(spec.name.as_str()) {
                return Err(ConfigError(format!(
                    "`schedules[{i}]`: the name `{}` is used twice; schedule names must be unique",
                    spec.name
                )));
            }
            out.push(
                spec.compile()
                    .map_err(|e| ConfigError(format!("`schedules[{i}]`: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Applies `--queues default=10,emails=4`.
    pub fn set_queues(&mut self, specs: &[String]) -> Result<(), ConfigError> {
        let mut queues = Vec::with_capacity(specs.len());
        for spec in specs {
            let (name, concurrency) = match spec.split_once('=') {
                Some((name, n)) => {
                    let n: u32 = n.trim().parse().map_err(|_| {
                        ConfigError(format!(
                            "--queues `{spec}`: concurrency `{n}` is not a whole number; write e.g. default=10"
                        ))
                    })?;
                    (name.trim(), n)
                }
                None => (spec.trim(), 10),
            };
            queues.push(QueueConfig {
                name: name.to_string(),
                concurrency,
            });
        }
        self.worker.queues = queues;
        self.worker
            .validate()
            .map_err(|e| ConfigError(format!("--queues: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid_and_sqlite() {
        let config = load(None, env(&[])).unwrap();
        assert_eq!(config.database.url, "sqlite://conveyor.db");
        assert_eq!(config.serve.listen.port(), 8080);
        assert_eq!(config.serve.roles.len(), 3);
    }

    #[test]
    fn file_then_env_override_in_order() {
        let dir = std::env::temp_dir().join(format!("conveyor-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[database]\nurl = \"sqlite://from-file.db\"\n[worker]\nlease = \"1m\"\nheartbeat = \"5s\"\n",
        )
        .unwrap();
        let config = load(
            Some(&file),
            env(&[
                ("CONVEYOR_DATABASE__URL", "postgres://u@h/db"),
                ("CONVEYOR_WORKER__FETCH_BATCH", "7"),
                ("CONVEYOR_BIN", "/not/a/config/key"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.database.url, "postgres://u@h/db");
        assert_eq!(config.worker.lease, std::time::Duration::from_secs(60));
        assert_eq!(config.worker.fetch_batch, 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let err = load(None, env(&[("CONVEYOR_WORKER__FETCH_BATCH", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.fetch_batch"), "{err}");

        let err = load(None, env(&[("CONVEYOR_DATABASE__URL", "mysql://x")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database.url") && err.contains("unknown scheme"),
            "{err}"
        );

        let err = load(None, env(&[("CONVEYOR_WORKER__HEARTBEAT", "1h")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.heartbeat"), "{err}");

        let err = load(Some(Path::new("/no/such/conveyor.toml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such file"), "{err}");
    }

    #[test]
    fn unknown_variables_are_refused_with_the_key_meant() {
        let err = load(None, env(&[("CONVEYOR_DATABSE__URL", "postgres://u@h/db")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CONVEYOR_DATABSE__URL names no config key")
                && err.contains("did you mean CONVEYOR_DATABASE__URL?"),
            "{err}"
        );
        let err = load(
            None,
            env(&[("CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASS", "1s")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("did you mean CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASE?"),
            "{err}"
        );
        let config = load(
            None,
            env(&[
                ("CONVEYOR_TEST_PG_URL", "postgres://x"),
                ("CONVEYOR_SERVICE_PORT", "8080"),
                ("CONVEYOR_API_KEY", "cvk_for_a_client"),
                ("CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASE", "2s"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.maintenance.rescuer.retry.base,
            std::time::Duration::from_secs(2)
        );
    }

    #[test]
    fn optional_keys_can_be_set_from_the_environment() {
        let config = load(
            None,
            env(&[
                ("CONVEYOR_DATABASE__URL", "postgres://u@h/db"),
                ("CONVEYOR_DATABASE__LISTEN_URL", "postgres://u@direct/db"),
                ("CONVEYOR_API__METRICS__LISTEN", "127.0.0.1:9090"),
                ("CONVEYOR_SECRETS__KEY_FILE", "/etc/conveyor/keys"),
                (
                    "CONVEYOR_HTTP_REQUESTS__SIGNING_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                ("CONVEYOR_BACKUP__SCRATCH_DIR", "/var/tmp"),
                ("CONVEYOR_EMAIL__TRANSPORTS__MAIN__HOST", "smtp.example.com"),
                ("CONVEYOR_EMAIL__TRANSPORTS__MAIN__PORT", "2525"),
                ("CONVEYOR_EMAIL__TRANSPORTS__MAIN__SECURITY", "none"),
                ("CONVEYOR_EMAIL__DEFAULT_TRANSPORT", "main"),
                ("CONVEYOR_EMAIL__MESSAGE_ID_DOMAIN", "mail.example.com"),
                ("CONVEYOR_EMAIL__PUBLIC_URL", "https://conveyor.example.com"),
            ]),
        )
        .unwrap();
        let main = &config.email.transports["main"];
        assert_eq!(
            (main.host.as_str(), main.port()),
            ("smtp.example.com", 2525)
        );
        assert_eq!(main.security, conveyor_jobs::email::Security::None);
        assert_eq!(config.email.default_transport.as_deref(), Some("main"));
        assert!(config.email.message_id_domain.is_some());
        assert_eq!(
            config.email.public_url.as_deref(),
            Some("https://conveyor.example.com")
        );
        assert!(config.database.listen_url.is_some() && config.api.metrics.listen.is_some());
        assert!(config.secrets.key_file.is_some());
        assert!(config.http_requests.signing_secret.is_some());
        assert_eq!(
            config.backup.scratch_dir.as_deref(),
            Some(Path::new("/var/tmp"))
        );
        assert_eq!(OPTIONAL_KEYS.len(), 8, "test each optional key above");
    }

    #[test]
    fn backup_destinations_and_sources_from_a_file_and_the_environment() {
        let dir = std::env::temp_dir().join(format!("conveyor-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[backup]\ndestination = \"offsite\"\n\
             [backup.destinations.offsite]\ntype = \"s3\"\nbucket = \"b\"\n\
             [backup.sources.shop]\ntype = \"postgres\"\nurl = \"postgres://u@h/shop\"\n",
        )
        .unwrap();
        let config = load(
            Some(&file),
            env(&[(
                "CONVEYOR_BACKUP__DESTINATIONS__OFFSITE__SECRET_ACCESS_KEY",
                "s3cr3t",
            )]),
        )
        .unwrap();
        match &config.backup.destinations["offsite"] {
            conveyor_backup::DestinationConfig::S3 {
                bucket,
                secret_access_key,
                ..
            } => {
                assert_eq!(bucket, "b");
                assert_eq!(secret_access_key.as_ref().unwrap().0, "s3cr3t");
                // Never shown by Debug (logs, error reports).
                assert!(!format!("{:?}", config.backup).contains("s3cr3t"));
            }
            other => panic!("{other:?}"),
        }
        // A default destination that names nothing, and a misspelt key, are errors naming them.
        std::fs::write(&file, "[backup]\ndestination = \"nowhere\"\n").unwrap();
        let err = load(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(
            err.contains("backup.destination") && err.contains("nowhere"),
            "{err}"
        );
        std::fs::write(
            &file,
            "[backup.destinations.d]\ntype = \"dir\"\npth = \"/x\"\n",
        )
        .unwrap();
        let err = load(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(err.contains("pth"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_in_a_file_are_refused() {
        let dir = std::env::temp_dir().join(format!("conveyor-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[worker]\nconcurrrency = 5\n").unwrap();
        let err = load(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(err.contains("concurrrency"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_example_file_loads_and_shows_the_defaults() {
        let file = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/conveyor.example.toml"
        ));
        let mut config = load(Some(file), env(&[])).unwrap();
        let mut defaults = Config::default();
        config.worker.id.clear();
        defaults.worker.id.clear();
        assert_eq!(config, defaults, "the example documents the defaults");
    }

    #[test]
    fn pooler_settings_are_checked() {
        let config = load(
            None,
            env(&[
                ("CONVEYOR_DATABASE__URL", "postgres://u@h/db"),
                ("CONVEYOR_DATABASE__POOLER", "transaction"),
                ("CONVEYOR_DATABASE__LISTEN_URL", "postgres://u@direct/db"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.database.pooler,
            conveyor_worker::store::Pooler::Transaction
        );
        let err = load(None, env(&[("CONVEYOR_DATABASE__POOLER", "statement")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pooler") && err.contains("transaction"),
            "{err}"
        );
        let err = load(None, env(&[("CONVEYOR_DATABASE__POOLER", "session")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Postgres only"), "{err}");
        let err = load(
            None,
            env(&[
                ("CONVEYOR_DATABASE__URL", "postgres://u@h/db"),
                ("CONVEYOR_DATABASE__LISTEN_URL", "redis://h"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("database.listen_url"), "{err}");
    }

    #[test]
    fn secrets_keys_from_env_and_file_are_checked_and_never_echoed() {
        let (a, b) = (
            conveyor_worker::keyring::Key::generate(),
            conveyor_worker::keyring::Key::generate(),
        );
        let (a64, b64) = (a.to_base64(), b.to_base64());
        let one = format!("{},{}", a64.as_str(), b64.as_str());
        let config = load(None, env(&[("CONVEYOR_SECRETS__KEYS", &one)])).unwrap();
        assert_eq!(config.secrets.keys, vec![a.clone(), b.clone()]);
        let config = load(None, env(&[("CONVEYOR_SECRETS__KEYS", a64.as_str())])).unwrap();
        assert_eq!(config.secrets.keys, vec![a.clone()]);
        assert!(
            !format!("{config:?}").contains(a64.as_str()),
            "Debug hides keys"
        );

        let dir = std::env::temp_dir().join(format!("conveyor-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, format!("[secrets]\nkeys = [\"{}\"]\n", b64.as_str())).unwrap();
        assert_eq!(load(Some(&file), env(&[])).unwrap().secrets.keys, vec![b]);
        std::fs::remove_dir_all(dir).unwrap();

        let short = "c2hvcnQ=";
        let err = load(None, env(&[("CONVEYOR_SECRETS__KEYS", short)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("secrets.keys")
                && err.contains("CONVEYOR_SECRETS__KEYS")
                && err.contains("openssl rand -base64 32")
                && !err.contains(short),
            "{err}"
        );
    }

    #[test]
    fn http_targets_from_a_file_and_the_environment() {
        let dir = std::env::temp_dir().join(format!("conveyor-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[http_requests]\nallow_raw_urls = true\nretry_statuses = [429, \"5xx\"]\n\
             [http_targets.billing]\nbase_url = \"https://billing.example.com/tasks/\"\n\
             timeout = \"10s\"\nrate_limit = 20\n",
        )
        .unwrap();
        let config = load(
            Some(&file),
            env(&[
                (
                    "CONVEYOR_HTTP_TARGETS__BILLING__SIGNING_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                (
                    "CONVEYOR_HTTP_TARGETS__BILLING__HEADERS__AUTHORIZATION",
                    "Bearer t0ken",
                ),
                (
                    "CONVEYOR_HTTP_TARGETS__MAIL__BASE_URL",
                    "http://mail.internal:8000/jobs",
                ),
            ]),
        )
        .unwrap();
        assert!(config.http_requests.allow_raw_urls);
        assert!(config.http_requests.retry_statuses.contains(503));
        assert!(!config.http_requests.retry_statuses.contains(408));
        let billing = &config.http_targets["billing"];
        assert_eq!(billing.timeout, Some(std::time::Duration::from_secs(10)));
        assert_eq!(billing.headers["authorization"], "Bearer t0ken");
        assert!(billing.signing_secret.is_some());
        assert_eq!(
            config.http_targets["mail"].base_url,
            "http://mail.internal:8000/jobs"
        );
        assert!(
            !format!("{config:?}").contains("t0ken") && !format!("{config:?}").contains("MfKQ9"),
            "Debug hides target credentials"
        );

        let err = load(
            Some(&file),
            env(&[(
                "CONVEYOR_HTTP_TARGETS__BILLING__BASE_URL",
                "ftp://x.example/",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("http_targets.billing.base_url"), "{err}");
        let err = load(
            Some(&file),
            env(&[(
                "CONVEYOR_HTTP_TARGETS__BILLING__SIGNING_SECRET",
                "not-base64!",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("http_targets.billing.signing_secret") && !err.contains("not-base64!"),
            "{err}"
        );
        let err = load(
            Some(&file),
            env(&[("CONVEYOR_HTTP_TARGETS__BILLING__TIMOUT", "1s")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("CONVEYOR_HTTP_TARGETS__BILLING__TIMOUT"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn queue_specs() {
        let mut config = Config::default();
        config
            .set_queues(&["default=3".into(), "emails".into()])
            .unwrap();
        assert_eq!(config.worker.queues[0].concurrency, 3);
        assert_eq!(config.worker.queues[1].concurrency, 10);
        let err = config.set_queues(&["a=x".into()]).unwrap_err().to_string();
        assert!(err.contains("not a whole number"), "{err}");
        let err = config
            .set_queues(&["bad name=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a valid"), "{err}");
    }
}
