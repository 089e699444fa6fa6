//! `[secrets]`: the keyring that encrypts credentials kept in the store, and the `conveyor
//! secrets` commands (generate-key, status, reencrypt, seal).
//!
//! Where the keys come from, first found wins: `secrets.keys` and `secrets.key_file` (both
//! read, `keys` first); else, for a SQLite file store, the key file beside the database
//! (`conveyor.db.keys`), created with mode 0600 on first use so that `conveyor serve` works
//! with no configuration; else none (Postgres and Redis: an explicit key is required as soon
//! as a secret is written).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use conveyor_jobs::webhook::Webhooks;
use conveyor_jobs::webhook::endpoint::{PLAINTEXT, SealPass, SealReport};
use conveyor_worker::keyring::{Key, KeyError, Keyring};

use crate::cli::OutputArgs;
use crate::config::{Config, ConfigError};

/// `secrets …`
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Print a new random key (base64) and its id, for `secrets.keys` or a key file.
    GenerateKey(OutputArgs),
    /// The configured key ids, and the store's secrets by the key they are encrypted with.
    Status(OutputArgs),
    /// Re-encrypt every stored secret with the current (first) key; after it, the other keys
    /// can be removed from the config.
    Reencrypt(OutputArgs),
    /// Encrypt a secret (read from stdin) for the config file: the printed `cv1:…` value goes
    /// in `http_targets.<name>.signing_secret` (or `http_requests.signing_secret`), or in
    /// `email.transports.<name>.password` or `email.dkim.<name>.private_key`, and opens only
    /// there, with the configured keys.
    Seal {
        /// Where the value goes: `http_targets.<name>`, `http_requests`,
        /// `email.transports.<name>` or `email.dkim.<name>`.
        #[arg(long = "for", value_name = "SECTION")]
        target: String,
    },
}

/// The default key file of a store, if it has one: beside a SQLite database file.
fn default_key_file(database_url: &str) -> Option<DefaultKey> {
    let rest = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.contains(":memory:") || database_url.contains("mode=memory") {
        return Some(DefaultKey::Memory);
    }
    Some(DefaultKey::File(PathBuf::from(format!("{path}.keys"))))
}

enum DefaultKey {
    /// An in-memory SQLite database lives as long as the process; so does its key.
    Memory,
    File(PathBuf),
}

/// The configured keyring. With `create`, a SQLite file store without configured keys gets
/// its key file made if it has none yet.
pub fn keyring(config: &Config, create: bool) -> anyhow::Result<Keyring> {
    let mut keys = config.secrets.keys.clone();
    if let Some(path) = &config.secrets.key_file {
        keys.extend(read_key_file(path, "`secrets.key_file`")?);
    }
    if keys.is_empty() {
        match default_key_file(&config.database.url) {
            Some(DefaultKey::Memory) => keys.push(Key::generate()),
            Some(DefaultKey::File(path)) if path.exists() => {
                keys.extend(read_key_file(&path, "the store's key file")?);
            }
            Some(DefaultKey::File(path)) if create => keys.push(create_key_file(&path)?),
            _ => {}
        }
    }
    Ok(Keyring::new(keys))
}

/// The keys of a key file: one per line, `#` comments and blank lines skipped.
fn read_key_file(path: &Path, what: &str) -> Result<Vec<Key>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "cannot read {what} {}: {e}; point `secrets.key_file` at a readable file",
            path.display()
        ))
    })?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(
            Key::parse(line).map_err(|e| {
                ConfigError(format!("{what} {} line {}: {e}", path.display(), n + 1))
            })?,
        );
    }
    if keys.is_empty() {
        return Err(ConfigError(format!(
            "{what} {} holds no key; write one key per line, current first ({})",
            path.display(),
            conveyor_worker::keyring::KEY_HINT
        )));
    }
    Ok(keys)
}

/// Makes the key file of a SQLite store: a fresh key, readable by its owner only.
fn create_key_file(path: &Path) -> anyhow::Result<Key> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = Key::generate();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        // Another process starting on the same database made it first: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Ok(read_key_file(path, "the store's key file")?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    ConfigError(format!(
                        "the store's key file {} holds no key yet; run again",
                        path.display()
                    ))
                })?);
        }
        Err(e) => {
            return Err(ConfigError(format!(
                "cannot create the secrets key file {}: {e}; set `secrets.keys` or `secrets.key_file` instead",
                path.display()
            ))
            .into());
        }
    };
    let body = format!(
        "# Conveyor secrets key (id {}). It encrypts the webhook signing secrets in the database\n\
         # beside it. Back it up apart from the database's backups (the two together reveal the\n\
         # secrets); without it they cannot be read. See docs/operations.md, Secrets at rest.\n{}\n",
        key.id(),
        key.to_base64().as_str()
    );
    file.write_all(body.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            ConfigError(format!(
                "cannot write the secrets key file {}: {e}",
                path.display()
            ))
        })?;
    tracing::warn!(
        path = %path.display(),
        key_id = key.id(),
        "no secrets key configured: generated one in {} (mode 0600) to encrypt webhook signing secrets; back it up apart from the database's backups",
        path.display()
    );
    Ok(key)
}

/// Runs one `secrets` command.
pub async fn run(webhooks: Option<Webhooks>, cmd: SecretsCommand) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::GenerateKey(out) => {
            let key = Key::generate();
            if out.json {
                return crate::output::json(&serde_json::json!({
                    "key": key.to_base64().as_str(),
                    "id": key.id(),
                }));
            }
            outln!("{}", key.to_base64().as_str());
            errln!(
                "key id {}: put it first in `secrets.keys` (or a line of `secrets.key_file`), then run `conveyor secrets reencrypt`",
                key.id()
            );
            Ok(())
        }
        SecretsCommand::Status(out) => {
            let hooks =
                webhooks.ok_or_else(|| anyhow::anyhow!("`secrets status` needs the store"))?;
            let report = hooks.seal_secrets(SealPass::Check).await?;
            print(hooks.keyring(), &report, out.json, false)
        }
        SecretsCommand::Reencrypt(out) => {
            let hooks =
                webhooks.ok_or_else(|| anyhow::anyhow!("`secrets reencrypt` needs the store"))?;
            if hooks.keyring().is_empty() {
                return Err(
                    conveyor_jobs::webhook::WebhookError::Secrets(KeyError::NoKey {
                        what: "`secrets reencrypt` encrypts with the first configured key".into(),
                    })
                    .into(),
                );
            }
            let report = hooks.seal_secrets(SealPass::Reencrypt).await?;
            print(hooks.keyring(), &report, out.json, true)
        }
        SecretsCommand::Seal { target } => {
            let hooks = webhooks.ok_or_else(|| anyhow::anyhow!("`secrets seal` needs the keys"))?;
            let mut secret = String::new();
            // A PEM key (email.dkim) is several lines; every other secret is one.
            let read = if target.starts_with("email.dkim.") {
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut secret)
            } else {
                std::io::stdin().read_line(&mut secret)
            };
            read.map_err(|e| {
                crate::input::usage(format!("cannot read the secret from stdin: {e}"))
            })?;
            outln!(
                "{}",
                seal_config_secret(hooks.keyring(), &target, secret.trim())?
            );
            Ok(())
        }
    }
}

/// Seals `secret` (`whsec_…`) for the signing secret of `section` (`http_targets.<name>` or
/// `http_requests`), bound to that config key.
pub fn seal_config_secret(keys: &Keyring, section: &str, secret: &str) -> anyhow::Result<String> {
    if let Some(name) = section.strip_prefix("email.transports.") {
        if conveyor_worker::job::check_name("transport", name).is_err() {
            return Err(crate::input::usage(format!(
                "--for `{section}`: name `email.transports.<name>` with the transport's name"
            )));
        }
        if secret.is_empty() {
            return Err(crate::input::usage("the password on stdin is empty"));
        }
        let sealed = keys
            .seal(secret, &conveyor_jobs::email::password_context(name))
            .map_err(|e| ConfigError(format!("`secrets seal`: {e}")))?;
        return Ok(sealed.as_str().to_string());
    }
    if let Some(name) = section.strip_prefix("email.dkim.") {
        // A domain-named entry is `email.dkim.example.com`: all after the prefix is its name.
        if name.is_empty() {
            return Err(crate::input::usage(format!(
                "--for `{section}`: name `email.dkim.<name>` with the key's entry name"
            )));
        }
        if secret.is_empty() {
            return Err(crate::input::usage("the private key on stdin is empty"));
        }
        let sealed = keys
            .seal(secret, &conveyor_jobs::email::dkim::key_context(name))
            .map_err(|e| ConfigError(format!("`secrets seal`: {e}")))?;
        return Ok(sealed.as_str().to_string());
    }
    let valid = section == "http_requests"
        || section
            .strip_prefix("http_targets.")
            .is_some_and(|name| conveyor_worker::job::check_name("target", name).is_ok());
    if !valid {
        return Err(crate::input::usage(format!(
            "--for `{section}`: name `http_targets.<name>`, `http_requests`, `email.transports.<name>` or `email.dkim.<name>`"
        )));
    }
    if conveyor_jobs::webhook::signature::secret_key(secret).is_err() {
        return Err(crate::input::usage(
            "the secret on stdin must be `whsec_` followed by base64 \
             (e.g. whsec_ and the output of `openssl rand -base64 24`)",
        ));
    }
    let key = format!("{section}.signing_secret");
    let sealed = keys
        .seal(secret, &conveyor_jobs::http_target::secret_context(&key))
        .map_err(|e| ConfigError(format!("`secrets seal`: {e}")))?;
    Ok(sealed.as_str().to_string())
}

fn print(keys: &Keyring, report: &SealReport, json: bool, reencrypt: bool) -> anyhow::Result<()> {
    let missing: Vec<&String> = report
        .by_key
        .keys()
        .filter(|id| *id != PLAINTEXT && !keys.has(id))
        .collect();
    if json {
        return crate::output::json(&serde_json::json!({
            "keys": keys.ids(),
            "current": keys.current().map(Key::id),
            "endpoints": report.endpoints,
            "secrets_by_key": report.by_key,
            "missing_keys": missing,
            "sealed": report.sealed,
            "reencrypted": report.reencrypted,
        }));
    }
    let ids = keys.ids();
    match ids.split_first() {
        Some((current, [])) => outln!("keys: {current} (current)"),
        Some((current, older)) => outln!("keys: {current} (current), {}", older.join(", ")),
        None => outln!("keys: none configured"),
    }
    outln!("webhook endpoints: {}", report.endpoints);
    for (id, n) in &report.by_key {
        let note = if id == PLAINTEXT {
            " (not encrypted yet: `conveyor serve` or `migrate` encrypts them)"
        } else if keys.current().is_some_and(|k| k.id() == id) {
            " (current key)"
        } else if keys.has(id) {
            " (older key: `conveyor secrets reencrypt` moves them to the current one)"
        } else {
            " (key not configured: add it, or these secrets cannot be read)"
        };
        outln!("secrets under {id}: {n}{note}");
    }
    if reencrypt {
        outln!(
            "re-encrypted {} secret(s), encrypted {} stored in clear",
            report.reencrypted,
            report.sealed
        );
        if ids.len() > 1 {
            outln!(
                "every secret is under key {}: the other keys ({}) can be removed from the config",
                ids[0],
                ids[1..].join(", ")
            );
        }
    }
    Ok(())
}
