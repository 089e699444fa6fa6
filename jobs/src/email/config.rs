//! `[email]` and `[email.transports.<name>]` in the config file. See docs/email.md.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::webhook::model::REDACTED;

/// `[email]`: what applies to every `email.send` job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// The transport a message that names none goes through. Unset: the only transport, if
    /// exactly one is configured.
    pub default_transport: Option<String>,
    /// Open SMTP connections kept per transport (a transport may set its own).
    pub pool_size: u32,
    /// Timeout of each SMTP command and of the connection (a transport may set its own).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// An idle pooled connection is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest attachment, decoded, in bytes.
    pub max_attachment_bytes: usize,
    /// Largest sum of every attachment of one message, decoded, in bytes.
    pub max_attachments_total_bytes: usize,
    /// The domain of the `Message-ID`s Conveyor makes (`<job id>@<domain>`). Unset: the
    /// domain of the message's `from` address.
    pub message_id_domain: Option<String>,
    /// The API's public base URL (`https://conveyor.example.com`). Set: every recipient of a
    /// message that names a `list` gets its own copy with a one-click unsubscribe link
    /// (RFC 8058) to `{public_url}/v1/unsubscribe/{token}` (see [`super::unsubscribe`]).
    pub public_url: Option<String>,
    /// How long the per-recipient results and the attempt log of a message are kept.
    #[serde(with = "humantime_serde")]
    pub records_ttl: Duration,
    /// The wait before each retry of a deferred message (a 4xx, greylisting, a failed
    /// connection): exponential from `base` by `factor` up to `max`, with `jitter`.
    pub retry: conveyor_worker::RetryPolicy,
    /// The named SMTP transports, by name.
    pub transports: BTreeMap<String, Transport>,
    /// DKIM signing keys, by name (see [`super::dkim`]).
    pub dkim: BTreeMap<String, super::dkim::DkimKey>,
    /// Limits per recipient domain, shared by every worker (see [`super::throttle`]).
    pub throttles: BTreeMap<String, super::throttle::Throttle>,
    /// Recipient domains counted under their own name in the email metrics, besides the
    /// throttled ones; every other domain is counted as `other` (recipient domains are
    /// unbounded, a metric's labels must not be).
    pub metrics_domains: Vec<String>,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            default_transport: None,
            pool_size: 10,
            timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_attachment_bytes: 10 * 1024 * 1024,
            max_attachments_total_bytes: 20 * 1024 * 1024,
            message_id_domain: None,
            public_url: None,
            records_ttl: Duration::from_secs(30 * 24 * 3600),
            // Greylisting servers want the sender back after a few minutes, not seconds.
            retry: conveyor_worker::RetryPolicy {
                base: Duration::from_secs(60),
                factor: 2.0,
                max: Duration::from_secs(2 * 3600),
                jitter: 0.2,
            },
            transports: BTreeMap::new(),
            dkim: BTreeMap::new(),
            throttles: BTreeMap::new(),
            metrics_domains: Vec::new(),
        }
    }
}

/// How a transport secures its connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
    /// Plain text upgraded with STARTTLS, which the server must offer (port 587).
    #[default]
    Starttls,
    /// STARTTLS when the server offers it, else plain text. Open to a downgrade by anyone
    /// on the path; for relays that may or may not have TLS.
    StarttlsOpportunistic,
    /// Plain text: only for a relay on the same host or a trusted network (port 25).
    None,
}

impl Security {
    /// The port used when a transport gives none.
    pub fn default_port(self) -> u16 {
        match self {
            Security::Tls => 465,
            Security::Starttls | Security::StarttlsOpportunistic => 587,
            Security::None => 25,
        }
    }

    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Tls => "tls",
            Security::Starttls => "starttls",
            Security::StarttlsOpportunistic => "starttls-opportunistic",
            Security::None => "none",
        }
    }
}

/// `[email.transports.<name>]`: one SMTP server messages may go through.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transport {
    /// The server's host name (also the name its TLS certificate must carry) or address.
    pub host: String,
    /// The port (`None`: 465 for `tls`, 587 for the STARTTLS modes, 25 for `none`).
    #[serde(default)]
    pub port: Option<u16>,
    /// `tls`, `starttls` (the default), `starttls-opportunistic` or `none`.
    #[serde(default)]
    pub security: Security,
    /// The user name for AUTH (PLAIN or LOGIN, whichever the server offers). Unset: no AUTH.
    #[serde(default)]
    pub username: Option<String>,
    /// The password, in clear or sealed with the secrets keys (`conveyor secrets seal --for
    /// email.transports.<name>`). At most one of `password`, `password_env`, `password_file`.
    #[serde(default)]
    pub password: Option<String>,
    /// The environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding the password (its first line; e.g. a mounted Kubernetes secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A PEM file of certificates to trust besides the public roots (a private CA, or a
    /// relay's self-signed certificate).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name sent in EHLO (`None`: `localhost`).
    #[serde(default)]
    pub hello_name: Option<String>,
    /// Pooled connections (`None`: `email.pool_size`).
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// Command and connection timeout (`None`: `email.timeout`).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// The `[email.dkim.<name>]` key that signs every message of this transport. Unset: the
    /// key of the message's `From` domain, if one is configured.
    #[serde(default)]
    pub dkim: Option<String>,
    /// SMTP transactions per second through this transport, across every worker.
    #[serde(default)]
    pub rate_per_second: Option<f64>,
    /// Transactions that may start at once after a quiet spell (default 1).
    #[serde(default)]
    pub burst: Option<f64>,
    /// Transactions in progress at once through this transport, across every worker.
    #[serde(default)]
    pub concurrency: Option<u32>,
}

impl Transport {
    /// The keys a transport has (the environment may set them:
    /// `CONVEYOR_EMAIL__TRANSPORTS__<NAME>__<KEY>`).
    pub const FIELDS: [&'static str; 15] = [
        "host",
        "port",
        "security",
        "username",
        "password",
        "password_env",
        "password_file",
        "ca_file",
        "hello_name",
        "pool_size",
        "timeout",
        "dkim",
        "rate_per_second",
        "burst",
        "concurrency",
    ];

    /// A transport to `host` with every other setting at its default.
    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port: None,
            security: Security::default(),
            username: None,
            password: None,
            password_env: None,
            password_file: None,
            ca_file: None,
            hello_name: None,
            pool_size: None,
            timeout: None,
            dkim: None,
            rate_per_second: None,
            burst: None,
            concurrency: None,
        }
    }

    /// The port connected to.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or_else(|| self.security.default_port())
    }

    /// The transport's own limits (`rate_per_second`, `burst`, `concurrency`).
    pub fn throttle(&self) -> super::throttle::Throttle {
        super::throttle::Throttle {
            rate_per_second: self.rate_per_second,
            burst: self.burst,
            concurrency: self.concurrency,
        }
    }
}

/// Never shows the password.
impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("hello_name", &self.hello_name)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("dkim", &self.dkim)
            .field("rate_per_second", &self.rate_per_second)
            .field("burst", &self.burst)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl EmailConfig {
    /// Checks what serde cannot; the message names the key and never shows a secret. Files
    /// and variables are read when the service is built ([`super::Emails::new`]).
    pub fn validate(&self) -> Result<(), String> {
        if self.pool_size == 0 {
            return Err("`email.pool_size` must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return Err("`email.timeout` must be more than 0s".into());
        }
        let r = &self.retry;
        if r.base.is_zero()
            || !r.factor.is_finite()
            || r.factor < 1.0
            || r.max < r.base
            || !(0.0..=1.0).contains(&r.jitter)
        {
            return Err(
                "`email.retry`: base must be more than 0s, factor at least 1, max at least base, jitter 0-1"
                    .into(),
            );
        }
        if self.max_attachment_bytes == 0 {
            return Err("`email.max_attachment_bytes` must be at least 1".into());
        }
        if let Some(domain) = &self.message_id_domain
            && !is_domain(domain)
        {
            return Err(format!(
                "`email.message_id_domain` = \"{domain}\": give a domain name such as mail.example.com"
            ));
        }
        if let Some(url) = &self.public_url {
            super::unsubscribe::check_public_url(url)?;
        }
        for (name, t) in &self.transports {
            let key = format!("email.transports.{name}");
            conveyor_worker::job::check_name(&key, name).map_err(|e| e.to_string())?;
            if t.host.trim().is_empty()
                || t.host.contains(['/', ' ', '@'])
                || t.host.contains("://")
            {
                return Err(format!(
                    "`{key}.host` = \"{}\": give the SMTP server's host name or address, without a scheme or port",
                    t.host
                ));
            }
            if t.port == Some(0) {
                return Err(format!("`{key}.port` must be 1-65535"));
            }
            let sources = [
                t.password.is_some(),
                t.password_env.is_some(),
                t.password_file.is_some(),
            ]
            .iter()
            .filter(|s| **s)
            .count();
            if sources > 1 {
                return Err(format!(
                    "`{key}`: give the password one way: password, password_env or password_file"
                ));
            }
            if sources == 1 && t.username.is_none() {
                return Err(format!(
                    "`{key}.username` is missing: a password is given, so AUTH needs the user name too"
                ));
            }
            if t.username.is_some() && sources == 0 {
                return Err(format!(
                    "`{key}`: `username` is given without a password (password, password_env or password_file)"
                ));
            }
            if t.pool_size == Some(0) {
                return Err(format!("`{key}.pool_size` must be at least 1"));
            }
            if t.timeout.is_some_and(|d| d.is_zero()) {
                return Err(format!("`{key}.timeout` must be more than 0s"));
            }
            if let Some(h) = &t.hello_name
                && !is_domain(h)
            {
                return Err(format!(
                    "`{key}.hello_name` = \"{h}\": give a host name such as mail.example.com"
                ));
            }
            if let Some(d) = &t.dkim
                && !self.dkim.contains_key(d)
            {
                return Err(format!(
                    "`{key}.dkim` = \"{d}\" names no `[email.dkim.<name>]` key ({})",
                    if self.dkim.is_empty() {
                        "none is configured".to_string()
                    } else {
                        let names: Vec<&str> = self.dkim.keys().map(String::as_str).collect();
                        format!("configured: {}", names.join(", "))
                    }
                ));
            }
        }
        super::dkim::validate(&self.dkim)?;
        for (name, t) in &self.transports {
            super::throttle::validate_transport(name, &t.throttle())?;
        }
        super::throttle::validate(&self.throttles)?;
        for d in &self.metrics_domains {
            if !is_domain(d) || d.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(format!(
                    "`email.metrics_domains`: \"{d}\" is not a domain in lower case, such as gmail.com"
                ));
            }
        }
        match &self.default_transport {
            Some(name) if !self.transports.contains_key(name) => Err(format!(
                "`email.default_transport` = \"{name}\" names no transport ({})",
                self.names_hint()
            )),
            _ => Ok(()),
        }
    }

    /// "configured: a, b" or how to add one.
    pub(crate) fn names_hint(&self) -> String {
        if self.transports.is_empty() {
            "none is configured: add one as [email.transports.<name>] with its host".into()
        } else {
            let names: Vec<&str> = self.transports.keys().map(String::as_str).collect();
            format!("configured: {}", names.join(", "))
        }
    }

    /// The `domain` label of the email metrics for recipient domain `domain` (lower case).
    pub fn metrics_domain<'a>(&self, domain: &'a str) -> &'a str {
        if self.throttles.contains_key(domain) || self.metrics_domains.iter().any(|d| d == domain) {
            domain
        } else {
            "other"
        }
    }

    /// The transport a message naming `name` (or none) goes through.
    pub fn transport_name<'a>(&'a self, name: Option<&'a str>) -> Result<&'a str, String> {
        match name.or(self.default_transport.as_deref()) {
            Some(n) if self.transports.contains_key(n) => Ok(n),
            Some(n) => Err(format!("no email transport `{n}` ({})", self.names_hint())),
            None if self.transports.len() == 1 => {
                Ok(self.transports.keys().next().map_or("", String::as_str))
            }
            None => Err(format!(
                "name the transport: several are configured and `email.default_transport` is unset ({})",
                self.names_hint()
            )),
        }
    }
}

/// A DNS name: labels of letters, digits and `-`, dots between.
pub(crate) fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &str, t: Transport) -> EmailConfig {
        let mut c = EmailConfig::default();
        c.transports.insert(name.into(), t);
        c
    }

    #[test]
    fn validation_names_the_key() {
        assert!(EmailConfig::default().validate().is_ok());
        let mut t = Transport::new("smtp.example.com");
        t.username = Some("app".into());
        let err = with("main", t.clone()).validate().unwrap_err();
        assert!(err.contains("email.transports.main"), "{err}");
        t.password = Some("hunter2".into());
        assert!(with("main", t.clone()).validate().is_ok());
        t.password_env = Some("SMTP_PASSWORD".into());
        let err = with("main", t).validate().unwrap_err();
        assert!(err.contains("one way") && !err.contains("hunter2"), "{err}");
        let err = with("main", Transport::new("smtp://x"))
            .validate()
            .unwrap_err();
        assert!(err.contains("email.transports.main.host"), "{err}");
        let mut c = with("main", Transport::new("smtp.example.com"));
        c.default_transport = Some("bulk".into());
        let err = c.validate().unwrap_err();
        assert!(
            err.contains("email.default_transport") && err.contains("main"),
            "{err}"
        );
    }

    #[test]
    fn transport_choice_and_debug() {
        let mut c = with("main", Transport::new("a.example"));
        assert_eq!(c.transport_name(None).unwrap(), "main");
        c.transports
            .insert("bulk".into(), Transport::new("b.example"));
        assert!(c.transport_name(None).unwrap_err().contains("bulk, main"));
        assert_eq!(c.transport_name(Some("bulk")).unwrap(), "bulk");
        assert!(c.transport_name(Some("x")).is_err());
        let mut t = Transport::new("a.example");
        t.password = Some("hunter2".into());
        assert!(!format!("{t:?}").contains("hunter2"));
        assert_eq!(Transport::new("a").port(), 587);
        let value = serde_json::to_value({
            let mut t = Transport::new("a");
            t.port = Some(1);
            t.username = Some("u".into());
            t.password = Some("p".into());
            t.password_env = Some("E".into());
            t.password_file = Some("/f".into());
            t.ca_file = Some("/c".into());
            t.hello_name = Some("h".into());
            t.pool_size = Some(1);
            t.timeout = Some(Duration::from_secs(1));
            t.dkim = Some("k".into());
            t.rate_per_second = Some(1.0);
            t.burst = Some(1.0);
            t.concurrency = Some(1);
            t
        })
        .unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut fields = Transport::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
    }
}
