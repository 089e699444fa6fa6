//! `email.send`: transactional email through SMTP.
//!
//! Where to start reading:
//! - [`Emails`]: the service — the configured transports, each a lettre SMTP client with
//!   its own connection pool and opened password; [`Emails::check_args`] is the enqueue-time
//!   rule, run by every client path through [`Emails::validators`].
//! - [`message`]: the args ([`EmailArgs`]) and the MIME message built from them.
//! - [`delivery`]: the job handler — one SMTP transaction per recipient not yet accepted,
//!   each reply classified (2xx accepted, 4xx and connection failures deferred and retried,
//!   5xx refused for good), the per-recipient results kept in the store
//!   ([`DeliveryRecord`]) so a retry never resends to a recipient that was accepted.
//! - [`suppression`]: the addresses never sent to (hard bounces, unsubscribes, by hand).
//! - [`template`]: stored, versioned templates rendered with minijinja.
//! - [`config`]: `[email]` and `[email.transports.<name>]`.
//! - [`dkim`]: `[email.dkim.<name>]`, the keys messages are signed with.
//! - [`throttle`]: the limits per recipient domain and per transport, kept in the store.
//! - [`unsubscribe`]: one-click unsubscribe links (RFC 8058) in the messages of a list.
//!
//! Passwords come from the config (in clear, or sealed with the secrets keys: `conveyor
//! secrets seal --for email.transports.<name>`), an environment variable or a file; they are
//! opened once here and never logged or shown.

pub mod config;
pub mod delivery;
pub mod dkim;
pub mod message;
pub mod suppression;
pub mod template;
pub mod throttle;
pub mod unsubscribe;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor_worker::keyring::{Keyring, Sealed};
use conveyor_worker::validate::ArgsValidators;
use conveyor_worker::{Error, JobContext, KindOptions, Registry, Store};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, Tokio1Executor};
use serde::Deserialize;

pub use config::{EmailConfig, Security, Transport};
pub use delivery::{DeliveryRecord, EmailAttempt, RecipientResult, RecipientStatus};
pub use message::{AttachmentArg, EmailArgs, MailboxArg, RecipientKind};
pub use template::{NewTemplate, Rendered, Template, TemplateRef, TemplateSummary};

/// The job kind.
pub const KIND: &str = "email.send";

/// Collection of the per-message delivery records, keyed by job id.
pub const DELIVERIES: &str = "email_deliveries";

/// Why the service could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// A setting is wrong; the message names the key (and never shows a secret).
    #[error("{0}")]
    Config(String),
    /// A sealed password does not open with the configured keys.
    #[error("`{key}`: {source}")]
    Secret {
        /// The config key.
        key: String,
        /// Why.
        source: conveyor_worker::keyring::KeyError,
    },
}

/// One transport, ready to send.
pub(crate) struct Smtp {
    pub(crate) client: AsyncSmtpTransport<Tokio1Executor>,
}

/// The `email.send` service: the settings, the transports with their pools, the store for
/// the delivery records. One per process, shared (`Arc`).
pub struct Emails {
    store: Arc<dyn Store>,
    config: EmailConfig,
    transports: HashMap<String, Smtp>,
    dkim: dkim::Signers,
    /// The secrets keys, which sign the unsubscribe links (see [`unsubscribe`]).
    keys: Keyring,
    log: crate::webhook::attempt_log::AttemptLog,
}

impl std::fmt::Debug for Emails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.transports.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Emails")
            .field("transports", &names)
            .finish_non_exhaustive()
    }
}

/// The record a sealed password is bound to (`conveyor secrets seal --for <record>`).
pub fn password_context(transport: &str) -> String {
    crate::http_target::secret_context(&format!("email.transports.{transport}.password"))
}

/// The password of transport `name`, from wherever the config says; `env` reads a variable.
fn open_password(
    name: &str,
    t: &Transport,
    keys: &Keyring,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, EmailError> {
    let key = format!("email.transports.{name}");
    if let Some(value) = &t.password {
        let sealed = Sealed::from_stored(value.as_str());
        if sealed.key_id().is_some() {
            return keys
                .open(&sealed, &password_context(name))
                .map(Some)
                .map_err(|source| EmailError::Secret {
                    key: format!("{key}.password"),
                    source,
                });
        }
        return Ok(Some(value.clone()));
    }
    if let Some(var) = &t.password_env {
        return match env(var) {
            Some(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(EmailError::Config(format!(
                "`{key}.password_env`: the environment variable {var} is unset or empty"
            ))),
        };
    }
    if let Some(path) = &t.password_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            EmailError::Config(format!(
                "`{key}.password_file`: cannot read {}: {e}",
                path.display()
            ))
        })?;
        let line = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end()
            .to_string();
        if line.is_empty() {
            return Err(EmailError::Config(format!(
                "`{key}.password_file`: {} is empty",
                path.display()
            )));
        }
        return Ok(Some(line));
    }
    Ok(None)
}

/// Builds transport `name`'s client (nothing is connected until the first message).
fn build_transport(
    config: &EmailConfig,
    name: &str,
    t: &Transport,
    password: Option<String>,
) -> Result<Smtp, EmailError> {
    let key = format!("email.transports.{name}");
    let tls = |t: &Transport| -> Result<TlsParameters, EmailError> {
        let mut b = TlsParameters::builder(t.host.clone());
        if let Some(path) = &t.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                EmailError::Config(format!(
                    "`{key}.ca_file`: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                EmailError::Config(format!(
                    "`{key}.ca_file`: {} is not a PEM certificate: {e}",
                    path.display()
                ))
            })?;
            b = b.add_root_certificate(cert);
        }
        b.build_rustls()
            .map_err(|e| EmailError::Config(format!("`{key}`: cannot set up TLS: {e}")))
    };
    let security = match t.security {
        Security::Tls => Tls::Wrapper(tls(t)?),
        Security::Starttls => Tls::Required(tls(t)?),
        Security::StarttlsOpportunistic => Tls::Opportunistic(tls(t)?),
        Security::None => Tls::None,
    };
    let timeout = t.timeout.unwrap_or(config.timeout);
    let pool = PoolConfig::new()
        .max_size(t.pool_size.unwrap_or(config.pool_size))
        .min_idle(0)
        .idle_timeout(config.idle_timeout);
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(t.host.clone())
        .port(t.port())
        .tls(security)
        .timeout(Some(timeout))
        .pool_config(pool);
    if let Some(hello) = &t.hello_name {
        builder = builder.hello_name(ClientId::Domain(hello.clone()));
    }
    if let (Some(user), Some(password)) = (&t.username, password) {
        builder = builder
            .credentials(Credentials::new(user.clone(), password))
            .authentication(vec![Mechanism::Plain, Mechanism::Login]);
    }
    Ok(Smtp {
        client: builder.build(),
    })
}

impl Emails {
    /// The service over `store` with `config`; sealed passwords open with `keys`, and
    /// `password_env` reads the process environment.
    pub fn new(
        store: Arc<dyn Store>,
        config: EmailConfig,
        keys: &Keyring,
    ) -> Result<Self, EmailError> {
        Self::with_env(store, config, keys, &|var| std::env::var(var).ok())
    }

    /// [`Emails::new`] reading variables through `env` (tests).
    pub fn with_env(
        store: Arc<dyn Store>,
        config: EmailConfig,
        keys: &Keyring,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, EmailError> {
        config.validate().map_err(EmailError::Config)?;
        let mut transports = HashMap::with_capacity(config.transports.len());
        for (name, t) in &config.transports {
            let password = open_password(name, t, keys, env)?;
            transports.insert(name.clone(), build_transport(&config, name, t, password)?);
        }
        let dkim = dkim::Signers::open(&config.dkim, keys, env)?;
        if config.public_url.is_some() && keys.is_empty() {
            return Err(EmailError::Config(
                "`email.public_url` is set, so the messages of a list carry unsubscribe links, which are signed with the secrets keys: set `secrets.keys` (CONVEYOR_SECRETS__KEYS) or `secrets.key_file`, or unset `email.public_url`".into(),
            ));
        }
        Ok(Self {
            store,
            config,
            transports,
            dkim,
            keys: keys.clone(),
            log: Default::default(),
        })
    }

    /// The rules alone, for checking messages at enqueue in a process that sends none (the
    /// CLI's commands): the config is validated, but no password is opened and no transport
    /// built, so an operator needs no SMTP credentials to enqueue.
    pub fn checker(store: Arc<dyn Store>, config: EmailConfig) -> Result<Self, EmailError> {
        config.validate().map_err(EmailError::Config)?;
        Ok(Self {
            store,
            config,
            transports: HashMap::new(),
            dkim: Default::default(),
            keys: Keyring::default(),
            log: Default::default(),
        })
    }

    /// `[email]`.
    pub fn config(&self) -> &EmailConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The enqueue-time rule of `email.send` (see [`EmailArgs::check`]). A refusal names its
    /// field inside the args.
    pub fn check_args(&self, args: &serde_json::Value) -> conveyor_worker::Result<()> {
        let args = EmailArgs::deserialize(args).map_err(|e| {
            Error::invalid(
                "",
                format!(
                    "{e}; `{KIND}` takes {{\"from\", \"to\", \"cc\", \"bcc\", \"reply_to\", \
                     \"subject\", \"text\", \"html\", \"attachments\", \"headers\", \"tags\", \
                     \"metadata\", \"transport\", \"template\", \"list\"}}"
                ),
            )
        })?;
        args.check(&self.config)
    }

    /// The enqueue-time checks of the kinds this service runs (`email.send`).
    pub fn validators(self: &Arc<Self>) -> ArgsValidators {
        let mut v = ArgsValidators::new();
        self.add_validators(&mut v);
        v
    }

    /// Adds `email.send`'s check to `validators`.
    pub fn add_validators(self: &Arc<Self>, validators: &mut ArgsValidators) {
        let me = self.clone();
        validators.register(KIND, move |args| me.check_args(args));
    }

    /// The longest one attempt may take: every recipient's transaction at the timeout.
    fn longest_attempt(&self) -> Duration {
        let timeout = self
            .config
            .transports
            .values()
            .filter_map(|t| t.timeout)
            .fold(self.config.timeout, Duration::max);
        // Connect, greeting, EHLO, TLS, AUTH, then MAIL, RCPT, DATA and the end of data for
        // each recipient: a generous bound.
        timeout * (4 + 4 * message::MAX_RECIPIENTS as u32).min(64)
    }
}

/// Registers `email.send`, run by `emails`.
pub fn register(registry: &mut Registry, emails: Arc<Emails>) {
    let options = KindOptions {
        timeout: Some(emails.longest_attempt()),
        retry: emails.config.retry.clone(),
    };
    registry.register_with(KIND, options, move |args: EmailArgs, ctx: JobContext| {
        let emails = emails.clone();
        async move { emails.run(args, ctx).await }
    });
}
