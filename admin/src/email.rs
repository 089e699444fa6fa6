//! Sending an email and reading one back: `POST /v1/emails` and `GET /v1/emails/{id}`, and
//! `conveyor email send` and `conveyor email show`, go through here.
//!
//! A send is an enqueue of an `email.send` job ([`crate::enqueue`]): the message is checked
//! by the kind's own rule (`conveyor_jobs::email::Emails::check_args`, installed with
//! [`crate::Admin::with_validators`]), the idempotency key follows the one rule of every key,
//! and the message's tags and metadata become the job's. A read joins the job (state,
//! attempts) with its delivery record (per-recipient results) and never shows an
//! attachment's content.

use chrono::{DateTime, Utc};
use conveyor_jobs::email::{
    DeliveryRecord, EmailArgs, EmailAttempt, KIND, MailboxArg, RecipientResult,
};
use conveyor_worker::JobId;
use serde::Serialize;

use crate::enqueue::{EnqueueOutcome, JobRequest};
use crate::{Actor, Admin, Error, Result};

/// A message to send, and how its job runs.
#[derive(Clone, Debug, Default)]
pub struct SendEmail {
    /// The message.
    pub message: EmailArgs,
    /// A second send with this key returns the first message's job.
    pub idempotency_key: Option<String>,
    /// The queue (default `default`).
    pub queue: Option<String>,
    /// Attempts before the message is given up (default 20).
    pub max_attempts: Option<i32>,
    /// Send no earlier than this.
    pub run_at: Option<DateTime<Utc>>,
}

/// One attachment as a read shows it: never its content.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AttachmentSummary {
    /// The file name.
    pub filename: String,
    /// The MIME type.
    pub content_type: String,
    /// Bytes, decoded.
    pub size: usize,
}

/// What a message says, without its bodies and attachments' content.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MessageSummary {
    /// The sender.
    pub from: MailboxArg,
    /// Reply-To.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MailboxArg>,
    /// To.
    pub to: Vec<MailboxArg>,
    /// Cc.
    pub cc: Vec<MailboxArg>,
    /// Bcc.
    pub bcc: Vec<MailboxArg>,
    /// The subject.
    pub subject: String,
    /// Whether it has a plain-text body given (else derived from the HTML).
    pub has_text: bool,
    /// Whether it has an HTML body.
    pub has_html: bool,
    /// The attachments.
    pub attachments: Vec<AttachmentSummary>,
    /// The custom headers' names.
    pub headers: Vec<String>,
    /// The transport asked for (absent: the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// One email: its job's state and its delivery.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EmailView {
    /// The job id.
    pub id: String,
    /// The job's state: `available`, `running`, `retryable`, `completed`, `dead`, …
    pub state: String,
    /// Attempts made.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When the next attempt may run (while not finished).
    pub run_at: DateTime<Utc>,
    /// When it finished (completed, dead, cancelled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finalized_at: Option<DateTime<Utc>>,
    /// The last attempt's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The `Message-ID` (known once an attempt ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Labels.
    pub tags: Vec<String>,
    /// Application data.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// The message.
    pub message: MessageSummary,
    /// Every recipient's result (empty before the first attempt).
    pub recipients: Vec<RecipientResult>,
    /// The attempts, oldest first.
    pub attempts: Vec<EmailAttempt>,
}

fn summary(m: &EmailArgs) -> MessageSummary {
    use base64::Engine;
    MessageSummary {
        from: m.from.clone(),
        reply_to: m.reply_to.clone(),
        to: m.to.clone(),
        cc: m.cc.clone(),
        bcc: m.bcc.clone(),
        subject: m.subject.clone(),
        has_text: m.text.is_some(),
        has_html: m.html.is_some(),
        attachments: m
            .attachments
            .iter()
            .map(|a| AttachmentSummary {
                filename: a.filename.clone(),
                content_type: a
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "application/octet-stream".into()),
                size: base64::engine::general_purpose::STANDARD
                    .decode(a.content.trim())
                    .map_or(0, |b| b.len()),
            })
            .collect(),
        headers: m.headers.keys().cloned().collect(),
        transport: m.transport.clone(),
    }
}

impl Admin {
    /// Checks and enqueues one message (see the module docs). Not audited: sends are the
    /// application's traffic, like enqueues.
    pub async fn send_email(&self, actor: &Actor, send: SendEmail) -> Result<EnqueueOutcome> {
        // The template is rendered and its version pinned by the enqueue, as for every
        // `email.send` job (see `Admin::pin_kind_args`).
        let tags = send.message.tags.clone();
        let metadata = send.message.metadata.clone();
        let args = serde_json::to_value(&send.message).map_err(conveyor_worker::Error::from)?;
        self.enqueue(
            actor,
            JobRequest {
                kind: KIND.into(),
                queue: send.queue,
                args: Some(args),
                max_attempts: send.max_attempts,
                run_at: send.run_at,
                idempotency_key: send.idempotency_key,
                tags,
                metadata,
                ..JobRequest::default()
            },
        )
        .await
        .map_err(|e| e.prefixed_args())
    }

    /// The enqueue-time rule of a job's args that needs the store, for every enqueue path
    /// (`POST /v1/emails`, `POST /v1/jobs`, a batch, `conveyor enqueue`, `conveyor email
    /// send`): an `email.send` job that names a template has it rendered now with its data, so
    /// an unknown template or version, or a variable the data lacks, is refused here (bad
    /// input, field `args.template.…`), and the version rendered is pinned in the args, so
    /// every attempt sends the same message. Other jobs pass unchanged. Run after the kind's
    /// own check ([`crate::Admin::with_validators`]).
    pub(crate) async fn pin_kind_args(
        &self,
        mut job: conveyor_worker::NewJob,
    ) -> Result<conveyor_worker::NewJob> {
        if job.kind != KIND || job.args.get("template").is_none_or(|t| t.is_null()) {
            return Ok(job);
        }
        let mut message: EmailArgs = serde_json::from_value(job.args.clone()).map_err(|e| {
            conveyor_worker::Error::invalid("args", format!("not an `{KIND}` message: {e}"))
        })?;
        self.pin_template(&mut message).await?;
        if let (Some(t), Some(obj)) = (&message.template, job.args.as_object_mut()) {
            // Only the version is added: the rest of the args stay as the client wrote them.
            obj.insert(
                "template".into(),
                serde_json::to_value(t).map_err(conveyor_worker::Error::from)?,
            );
        }
        Ok(job)
    }

    /// Renders `message`'s template (after the message's own check), checks the rendered
    /// message by the kind's rule, and pins the version rendered.
    async fn pin_template(&self, message: &mut EmailArgs) -> Result<()> {
        let to_value =
            |m: &EmailArgs| serde_json::to_value(m).map_err(conveyor_worker::Error::from);
        self.validators.check(KIND, &to_value(message)?)?;
        let rendered = conveyor_jobs::email::template::render_message(self.store.as_ref(), message)
            .await
            .map_err(|e| match e {
                conveyor_worker::Error::InvalidInput { field, message } => {
                    conveyor_worker::Error::InvalidInput {
                        field: format!("args.{field}"),
                        message,
                    }
                }
                other => other,
            })?;
        if let Some((rendered, version)) = rendered {
            self.validators.check(KIND, &to_value(&rendered)?)?;
            if let Some(t) = message.template.as_mut() {
                t.version = Some(version);
            }
        }
        Ok(())
    }

    /// One email by its job id: not found when the job does not exist or is not an email.
    pub async fn email(&self, id: JobId) -> Result<EmailView> {
        let not_found = || Error::NotFound(format!("email {id} not found"));
        let job = self.store.get(id).await?.ok_or_else(not_found)?;
        if job.kind != KIND {
            return Err(not_found());
        }
        let message: EmailArgs = serde_json::from_value(job.args.clone()).unwrap_or_default();
        let record: Option<DeliveryRecord> =
            conveyor_jobs::email::delivery::record(self.store.as_ref(), &id.to_string()).await?;
        let (message_id, recipients, attempts) = match record {
            Some(r) => (Some(r.message_id), r.recipients, r.attempts),
            None => (None, Vec::new(), Vec::new()),
        };
        Ok(EmailView {
            id: id.to_string(),
            state: job.state.to_string(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            created_at: job.created_at,
            run_at: job.run_at,
            finalized_at: job.finalized_at,
            last_error: job.attempts.iter().rev().find_map(|a| a.error.clone()),
            message_id,
            tags: job.tags,
            metadata: job.metadata,
            message: summary(&message),
            recipients,
            attempts,
        })
    }
}

impl Error {
    /// An enqueue's `args.` fields are the message's own fields in an email send.
    fn prefixed_args(self) -> Self {
        match self {
            Error::Store(conveyor_worker::Error::InvalidInput { field, message }) => {
                let field = field
                    .strip_prefix("args.")
                    .map(str::to_string)
                    .unwrap_or(field);
                Error::Store(conveyor_worker::Error::InvalidInput { field, message })
            }
            other => other,
        }
    }
}
