//! `email.send` in the binary: the service built from `[email]` for `serve` (which runs the
//! kind and checks its enqueues), the enqueue checks of the admin commands, and
//! `conveyor email send|show`, which call `conveyor_admin::Admin` as `POST /v1/emails` and
//! `GET /v1/emails/{id}` do.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use clap::{Args, Subcommand};
use conveyor_admin::email::{EmailView, SendEmail};
use conveyor_admin::{Actor, Admin};
use conveyor_jobs::email::{AttachmentArg, EmailArgs, Emails, MailboxArg};
use conveyor_jobs::http_target::HttpTargets;
use conveyor_worker::Store;
use conveyor_worker::keyring::Keyring;
use conveyor_worker::validate::ArgsValidators;

use crate::config::{Config, ConfigError};
use crate::input::usage;
use crate::output;

/// The `email.send` service over `store`, its transports built and passwords opened (sealed
/// ones with `keys`). A wrong setting is a [`ConfigError`] (exit 2).
pub fn service(
    config: &Config,
    store: Arc<dyn Store>,
    keys: &Keyring,
) -> anyhow::Result<Arc<Emails>> {
    Emails::new(store, config.email.clone(), keys)
        .map(Arc::new)
        .map_err(|e| ConfigError(e.to_string()).into())
}

/// The rules of `email.send` alone (no password opened), for the admin commands.
pub fn checker(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Arc<Emails>> {
    Emails::checker(store, config.email.clone())
        .map(Arc::new)
        .map_err(|e| ConfigError(e.to_string()).into())
}

/// The enqueue-time checks of every kind the binary knows (see
/// `conveyor_worker::validate`): `http.request`'s and `email.send`'s rules, and that the args
/// of every kind `kinds` has a handler for fit its args type.
pub fn validators(
    targets: &Arc<HttpTargets>,
    emails: &Arc<Emails>,
    kinds: &conveyor_worker::Registry,
) -> Arc<ArgsValidators> {
    let mut validators = targets.validators();
    emails.add_validators(&mut validators);
    validators.check_types_of(kinds);
    Arc::new(validators)
}

/// `email …`
#[derive(Debug, Subcommand)]
pub enum EmailCommand {
    /// Queue one message (checked now; sent by a worker through the configured transport).
    Send(Box<SendArgs>),
    /// One message: state, attempts and every recipient's result.
    Show {
        /// The email's id (printed by `send`).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stored templates: create (a new version), list, show, preview, delete.
    #[command(subcommand)]
    Templates(crate::email_templates::TemplateCommand),
    /// The suppression list: add, list, remove.
    #[command(subcommand)]
    Suppressions(crate::email_suppressions::SuppressionCommand),
}

/// `email send`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The whole message as JSON (`@file.json`, `@-` for stdin), in the shape of
    /// `POST /v1/emails`; the flags below add to it.
    #[arg(long, value_name = "JSON")]
    message: Option<String>,
    /// The sender: `name@example.com` or `Name <name@example.com>`.
    #[arg(long)]
    from: Option<String>,
    /// A recipient (repeat for more).
    #[arg(long)]
    to: Vec<String>,
    /// A Cc recipient (repeat for more).
    #[arg(long)]
    cc: Vec<String>,
    /// A Bcc recipient (repeat for more).
    #[arg(long)]
    bcc: Vec<String>,
    /// Where replies go.
    #[arg(long)]
    reply_to: Option<String>,
    /// The subject.
    #[arg(long)]
    subject: Option<String>,
    /// The plain-text body (`@file` reads a file).
    #[arg(long)]
    text: Option<String>,
    /// The HTML body (`@file` reads a file); without --text the text is derived from it.
    #[arg(long)]
    html: Option<String>,
    /// Attach a file: `PATH` or `PATH:CONTENT_TYPE` (repeat for more).
    #[arg(long, value_name = "PATH[:TYPE]")]
    attach: Vec<String>,
    /// A custom header `NAME=VALUE` (repeat for more).
    #[arg(long, value_name = "NAME=VALUE")]
    header: Vec<String>,
    /// A tag (repeat for more).
    #[arg(long)]
    tag: Vec<String>,
    /// Application metadata, a JSON object.
    #[arg(long, value_name = "JSON")]
    metadata: Option<String>,
    /// The transport (`[email.transports.<name>]`); default `email.default_transport`.
    #[arg(long)]
    transport: Option<String>,
    /// The list/topic the message belongs to (recipients suppressed for it are skipped).
    #[arg(long)]
    list: Option<String>,
    /// A stored template giving the subject and bodies (instead of --subject, --text, --html).
    #[arg(long, value_name = "NAME")]
    template: Option<String>,
    /// The template's version (default: the latest, pinned now).
    #[arg(long, value_name = "N", requires = "template")]
    template_version: Option<u32>,
    /// The template's variables, a JSON object (`@file.json`).
    #[arg(long, value_name = "JSON", requires = "template")]
    data: Option<String>,
    /// A second send with this key returns the first message and sends nothing.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// The queue its job runs on.
    #[arg(long)]
    queue: Option<String>,
    /// Attempts before the message is given up.
    #[arg(long)]
    max_attempts: Option<i32>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A body flag's text: `@path` reads the file.
pub(crate) fn text_flag(flag: &str, value: &str) -> anyhow::Result<String> {
    match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| usage(format!("{flag} @{path}: cannot read the file: {e}"))),
        None => Ok(value.to_string()),
    }
}

impl SendArgs {
    fn message(&self) -> anyhow::Result<EmailArgs> {
        let mut m: EmailArgs = match &self.message {
            Some(text) => {
                let value = crate::input::json_flag("--message", text)?;
                serde_json::from_value(value)
                    .map_err(|e| usage(format!("--message is not a message: {e}")))?
            }
            None => EmailArgs::default(),
        };
        if let Some(from) = &self.from {
            m.from = MailboxArg::Text(from.clone());
        }
        m.to.extend(self.to.iter().map(|s| MailboxArg::Text(s.clone())));
        m.cc.extend(self.cc.iter().map(|s| MailboxArg::Text(s.clone())));
        m.bcc
            .extend(self.bcc.iter().map(|s| MailboxArg::Text(s.clone())));
        if let Some(r) = &self.reply_to {
            m.reply_to = Some(MailboxArg::Text(r.clone()));
        }
        if let Some(s) = &self.subject {
            m.subject = s.clone();
        }
        if let Some(t) = &self.text {
            m.text = Some(text_flag("--text", t)?);
        }
        if let Some(h) = &self.html {
            m.html = Some(text_flag("--html", h)?);
        }
        for a in &self.attach {
            let (path, content_type) = match a.rsplit_once(':') {
                Some((p, t)) if t.contains('/') => (p, Some(t.to_string())),
                _ => (a.as_str(), None),
            };
            let path = PathBuf::from(path);
            let bytes = std::fs::read(&path).map_err(|e| {
                usage(format!(
                    "--attach {}: cannot read the file: {e}",
                    path.display()
                ))
            })?;
            let filename = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            m.attachments.push(AttachmentArg {
                filename,
                content_type,
                content: base64::engine::general_purpose::STANDARD.encode(bytes),
            });
        }
        for h in &self.header {
            let Some((k, v)) = h.split_once('=') else {
                return Err(usage(format!("--header `{h}` must be NAME=VALUE")));
            };
            m.headers.insert(k.trim().to_string(), v.trim().to_string());
        }
        m.tags.extend(self.tag.iter().cloned());
        if let Some(meta) = &self.metadata {
            m.metadata = Some(crate::input::json_flag("--metadata", meta)?);
        }
        if let Some(t) = &self.transport {
            m.transport = Some(t.clone());
        }
        if let Some(l) = &self.list {
            m.list = Some(l.clone());
        }
        if let Some(name) = &self.template {
            m.template = Some(conveyor_jobs::email::TemplateRef {
                name: name.clone(),
                version: self.template_version,
                data: self
                    .data
                    .as_deref()
                    .map(|d| crate::input::json_flag("--data", d))
                    .transpose()?,
            });
        }
        Ok(m)
    }
}

/// Runs one `email` command.
pub async fn run(admin: &Admin, cmd: EmailCommand) -> anyhow::Result<()> {
    match cmd {
        EmailCommand::Send(args) => {
            let message = args.message()?;
            let outcome = admin
                .send_email(
                    &Actor::cli(),
                    SendEmail {
                        message,
                        idempotency_key: args.idempotency_key.clone(),
                        queue: args.queue.clone(),
                        max_attempts: args.max_attempts,
                        run_at: None,
                    },
                )
                .await?;
            let id = outcome.enqueued.id;
            if args.json {
                return output::json(&serde_json::json!({
                    "id": id.to_string(),
                    "duplicate": outcome.enqueued.duplicate,
                    "warnings": outcome.warnings,
                }));
            }
            if outcome.enqueued.duplicate {
                outln!("{id} (duplicate idempotency key: the first send; nothing new was queued)");
            } else {
                outln!("{id} queued");
            }
            for w in &outcome.warnings {
                errln!("warning: {w}");
            }
            Ok(())
        }
        EmailCommand::Templates(cmd) => crate::email_templates::run(admin, cmd).await,
        EmailCommand::Suppressions(cmd) => crate::email_suppressions::run(admin, cmd).await,
        EmailCommand::Show { id, json } => {
            let id: conveyor_worker::JobId = id
                .trim()
                .parse()
                .map_err(|_| usage(format!("`{id}` is not an email id (a UUID)")))?;
            let view = admin.email(id).await?;
            if json {
                return output::json(&view);
            }
            print_view(&view);
            Ok(())
        }
    }
}

fn mailbox(m: &MailboxArg) -> String {
    match m {
        MailboxArg::Text(t) => t.clone(),
        MailboxArg::Parts {
            email,
            name: Some(n),
        } => format!("{n} <{email}>"),
        MailboxArg::Parts { email, name: None } => email.clone(),
    }
}

fn print_view(v: &EmailView) {
    let m = &v.message;
    let list = |l: &[MailboxArg]| l.iter().map(mailbox).collect::<Vec<_>>().join(", ");
    outln!("id:          {}", v.id);
    outln!(
        "state:       {} (attempt {} of {})",
        v.state,
        v.attempt,
        v.max_attempts
    );
    outln!("subject:     {}", m.subject);
    outln!("from:        {}", mailbox(&m.from));
    for (label, l) in [("to:", &m.to), ("cc:", &m.cc), ("bcc:", &m.bcc)] {
        if !l.is_empty() {
            outln!("{label:<12} {}", list(l));
        }
    }
    if let Some(id) = &v.message_id {
        outln!("message-id:  {id}");
    }
    if let Some(t) = &m.transport {
        outln!("transport:   {t}");
    }
    for a in &m.attachments {
        outln!(
            "attachment:  {} ({}, {} bytes)",
            a.filename,
            a.content_type,
            a.size
        );
    }
    if let Some(e) = &v.last_error {
        outln!("last error:  {e}");
    }
    if !v.recipients.is_empty() {
        outln!("recipients:");
        for r in &v.recipients {
            let code = r.code.map(|c| format!(" {c}")).unwrap_or_default();
            let status = serde_json::to_value(r.status)
                .ok()
                .and_then(|s| s.as_str().map(str::to_string))
                .unwrap_or_default();
            outln!(
                "  {:<32} {status}{code} {}",
                r.address,
                r.reply.as_deref().unwrap_or("")
            );
        }
    }
    if !v.attempts.is_empty() {
        outln!("attempts:");
        for a in &v.attempts {
            outln!(
                "  #{} {} via {}: {} accepted, {} deferred, {} refused, {} suppressed ({} ms) -> {}{}",
                a.attempt,
                output::time(a.at),
                a.transport,
                a.accepted,
                a.deferred,
                a.refused,
                a.suppressed,
                a.latency_ms,
                a.result,
                a.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
}
