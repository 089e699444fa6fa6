//! The args of `email.send` and the MIME message built from them.
//!
//! [`EmailArgs::check`] is the one rule of a message, run at enqueue (a refusal names its
//! field inside the args) and again before each attempt; [`EmailArgs::build`] makes the
//! message: `multipart/alternative` text and HTML (the text derived from the HTML when only
//! HTML is given), inside `multipart/mixed` with the attachments, and a `Message-ID` made
//! from the job id so every attempt sends the same one.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use conveyor_worker::{Error, JobArgs};
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment as MimeAttachment, Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};
use serde::{Deserialize, Serialize};

use super::KIND;
use super::config::{EmailConfig, is_domain};
use super::template::{TemplateRef, check_name};

/// Most recipients (to, cc and bcc together) of one message.
pub const MAX_RECIPIENTS: usize = 100;
/// Most custom headers of one message.
pub const MAX_HEADERS: usize = 32;
/// Most attachments of one message.
pub const MAX_ATTACHMENTS: usize = 32;
/// Longest subject, in characters.
pub const MAX_SUBJECT: usize = 998;

/// Args of `email.send`: one message.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailArgs {
    /// The sender, also the envelope sender (where bounces go).
    pub from: MailboxArg,
    /// Where replies go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MailboxArg>,
    /// Recipients shown in `To`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<MailboxArg>,
    /// Recipients shown in `Cc`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<MailboxArg>,
    /// Recipients not shown in the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bcc: Vec<MailboxArg>,
    /// The subject (any characters but line breaks; encoded as RFC 2047 when not ASCII).
    /// Absent with `template`: the template's.
    #[serde(default)]
    pub subject: String,
    /// The plain-text body. Absent with `html` given: derived from the HTML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The HTML body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Files attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentArg>,
    /// Extra headers (`X-…`, `List-Id`, …); the headers Conveyor writes are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Labels, copied to the job's tags by `POST /v1/emails` and `conveyor email send`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Application data (a JSON object), copied to the job's metadata likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// The transport (`[email.transports.<name>]`); absent: `email.default_transport`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// A stored template that gives the subject and bodies, rendered with its data (then
    /// `subject`, `text` and `html` must be absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    /// The list/topic the message belongs to (`newsletter`): a recipient suppressed for it
    /// (or for every list) is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
}

impl JobArgs for EmailArgs {
    const KIND: &'static str = KIND;
}

/// An address: `"Ada Lovelace <ada@example.com>"`, `"ada@example.com"`, or
/// `{"email": "ada@example.com", "name": "Ada Lovelace"}`. Names may be any Unicode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MailboxArg {
    /// As written in a header.
    Text(String),
    /// Address and display name apart.
    Parts {
        /// The address.
        email: String,
        /// The display name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

impl Default for MailboxArg {
    fn default() -> Self {
        MailboxArg::Text(String::new())
    }
}

impl From<&str> for MailboxArg {
    fn from(s: &str) -> Self {
        MailboxArg::Text(s.to_string())
    }
}

impl MailboxArg {
    /// The parsed mailbox; `Err` says what is wrong (without the field).
    pub fn parse(&self) -> Result<Mailbox, String> {
        let check_name = |name: &str| {
            if name.chars().any(char::is_control) {
                Err("the name must not contain control characters or line breaks".to_string())
            } else {
                Ok(())
            }
        };
        match self {
            MailboxArg::Text(text) => {
                if text.chars().any(char::is_control) {
                    return Err("must not contain control characters or line breaks".into());
                }
                text.trim().parse::<Mailbox>().map_err(|e| {
                    format!(
                        "`{text}` is not an email address ({e}); write `name@example.com` or `Name <name@example.com>`"
                    )
                })
            }
            MailboxArg::Parts { email, name } => {
                let address = email
                    .trim()
                    .parse::<Address>()
                    .map_err(|e| format!("`{email}` is not an email address ({e})"))?;
                if let Some(n) = name {
                    check_name(n)?;
                }
                Ok(Mailbox::new(
                    name.clone().filter(|n| !n.trim().is_empty()),
                    address,
                ))
            }
        }
    }
}

/// One attached file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentArg {
    /// The file name shown to the recipient.
    pub filename: String,
    /// The MIME type (default `application/octet-stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The file's bytes in standard base64.
    pub content: String,
}

/// How a recipient was addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecipientKind {
    /// `to`.
    To,
    /// `cc`.
    Cc,
    /// `bcc`.
    Bcc,
}

/// A message ready to send: its bytes (the same on every recipient's transaction) and
/// recipients, each once.
#[derive(Clone, Debug)]
pub struct Built {
    /// The envelope sender.
    pub from: Address,
    /// Every distinct recipient address, in the order given (to, cc, bcc).
    pub recipients: Vec<(Address, RecipientKind)>,
    /// The formatted message.
    pub raw: Vec<u8>,
    /// The message before formatting (signed with DKIM, when a key applies, then formatted
    /// again).
    pub message: lettre::Message,
    /// The `Message-ID` header's value, `<…>`.
    pub message_id: String,
}

/// Headers Conveyor writes (`List-Unsubscribe*`: the one-click unsubscribe link), refused in `headers`.
fn reserved_header(lower: &str) -> bool {
    matches!(
        lower,
        "from"
            | "sender"
            | "reply-to"
            | "to"
            | "cc"
            | "bcc"
            | "subject"
            | "date"
            | "message-id"
            | "mime-version"
            | "content-type"
            | "content-transfer-encoding"
            | "content-disposition"
            | "return-path"
            | "received"
            | "dkim-signature"
            | "list-unsubscribe"
            | "list-unsubscribe-post"
    ) || lower.starts_with("x-conveyor-")
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::invalid(field, message)
}

impl EmailArgs {
    /// The one rule of a message (see the module docs). `Err` is bad input whose field is a
    /// path inside the args (`to[1]`, `attachments[0].content`).
    pub fn check(&self, config: &EmailConfig) -> conveyor_worker::Result<()> {
        self.from.parse().map_err(|m| invalid("from", m))?;
        if let Some(r) = &self.reply_to {
            r.parse().map_err(|m| invalid("reply_to", m))?;
        }
        let mut count = 0;
        for (field, list) in [("to", &self.to), ("cc", &self.cc), ("bcc", &self.bcc)] {
            for (i, m) in list.iter().enumerate() {
                m.parse().map_err(|e| invalid(format!("{field}[{i}]"), e))?;
            }
            count += list.len();
        }
        if count == 0 {
            return Err(invalid(
                "to",
                "give at least one recipient in to, cc or bcc",
            ));
        }
        if count > MAX_RECIPIENTS {
            return Err(invalid(
                "to",
                format!(
                    "{count} recipients; at most {MAX_RECIPIENTS} in to, cc and bcc together (send several messages)"
                ),
            ));
        }
        if let Some(l) = &self.list {
            super::suppression::check_list(l).map_err(|m| invalid("list", m))?;
        }
        if let Some(t) = &self.template {
            check_name(&t.name).map_err(|m| invalid("template.name", m))?;
            if t.version == Some(0) {
                return Err(invalid("template.version", "versions start at 1"));
            }
            if let Some(d) = &t.data
                && !d.is_object()
            {
                return Err(invalid(
                    "template.data",
                    "must be a JSON object of the template's variables",
                ));
            }
            for (field, given) in [
                ("subject", !self.subject.is_empty()),
                ("text", self.text.is_some()),
                ("html", self.html.is_some()),
            ] {
                if given {
                    return Err(invalid(
                        field,
                        "the template gives the subject and bodies: leave out subject, text and html, or the template",
                    ));
                }
            }
        } else if self.subject.is_empty() {
            return Err(invalid("subject", "give the subject (or a template)"));
        }
        if self.subject.chars().count() > MAX_SUBJECT {
            return Err(invalid(
                "subject",
                format!("at most {MAX_SUBJECT} characters"),
            ));
        }
        if self.subject.contains(['\r', '\n']) {
            return Err(invalid("subject", "must be one line"));
        }
        if self.text.is_none() && self.html.is_none() && self.template.is_none() {
            return Err(invalid("text", "give the body: text, html or both"));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(invalid("headers", format!("at most {MAX_HEADERS} headers")));
        }
        for (name, value) in &self.headers {
            check_header(name, value).map_err(|m| invalid(format!("headers.{name}"), m))?;
        }
        if self.attachments.len() > MAX_ATTACHMENTS {
            return Err(invalid(
                "attachments",
                format!("at most {MAX_ATTACHMENTS} attachments"),
            ));
        }
        let mut total = 0usize;
        for (i, a) in self.attachments.iter().enumerate() {
            let size = check_attachment(a, config.max_attachment_bytes)
                .map_err(|(f, m)| invalid(format!("attachments[{i}].{f}"), m))?;
            total += size;
        }
        if total > config.max_attachments_total_bytes {
            return Err(invalid(
                "attachments",
                format!(
                    "{total} bytes together; the limit (email.max_attachments_total_bytes) is {} bytes",
                    config.max_attachments_total_bytes
                ),
            ));
        }
        config
            .transport_name(self.transport.as_deref())
            .map_err(|m| invalid("transport", m))?;
        Ok(())
    }

    /// The message for job `job_id` (checked first, see [`EmailArgs::check`]).
    pub fn build(&self, config: &EmailConfig, job_id: &str) -> conveyor_worker::Result<Built> {
        self.check(config)?;
        let parse = |m: &MailboxArg, field: &str| m.parse().map_err(|e| invalid(field, e));
        let from = parse(&self.from, "from")?;
        let domain = config
            .message_id_domain
            .clone()
            .unwrap_or_else(|| from.email.domain().to_string());
        let domain = if is_domain(&domain) {
            domain
        } else {
            "conveyor.invalid".to_string()
        };
        let message_id = format!("<{job_id}@{domain}>");
        let mut builder = Message::builder()
            .from(from.clone())
            .subject(self.subject.clone())
            .message_id(Some(message_id.clone()));
        if let Some(r) = &self.reply_to {
            builder = builder.reply_to(parse(r, "reply_to")?);
        }
        let mut recipients: Vec<(Address, RecipientKind)> = Vec::new();
        let mut add = |address: &Address, kind| {
            if !recipients.iter().any(|(a, _)| same_address(a, address)) {
                recipients.push((address.clone(), kind));
            }
        };
        for (i, m) in self.to.iter().enumerate() {
            let mb = parse(m, &format!("to[{i}]"))?;
            add(&mb.email, RecipientKind::To);
            builder = builder.to(mb);
        }
        for (i, m) in self.cc.iter().enumerate() {
            let mb = parse(m, &format!("cc[{i}]"))?;
            add(&mb.email, RecipientKind::Cc);
            builder = builder.cc(mb);
        }
        for (i, m) in self.bcc.iter().enumerate() {
            let mb = parse(m, &format!("bcc[{i}]"))?;
            add(&mb.email, RecipientKind::Bcc);
        }
        let envelope = lettre::address::Envelope::new(
            Some(from.email.clone()),
            recipients.iter().map(|(a, _)| a.clone()).collect(),
        )
        .map_err(|e| invalid("to", e.to_string()))?;
        builder = builder.envelope(envelope);
        for (name, value) in &self.headers {
            let header = HeaderName::new_from_ascii(name.clone())
                .map_err(|_| invalid(format!("headers.{name}"), "not a valid header name"))?;
            builder = builder.raw_header(HeaderValue::new(header, value.clone()));
        }

        let body = match (&self.text, &self.html) {
            (Some(text), None) => Body::Single(SinglePart::plain(text.clone())),
            (text, Some(html)) => {
                let text = match text {
                    Some(t) => t.clone(),
                    None => html_to_text(html),
                };
                Body::Multi(MultiPart::alternative_plain_html(text, html.clone()))
            }
            (None, None) => return Err(invalid("text", "give the body: text, html or both")),
        };
        let message = if self.attachments.is_empty() {
            match body {
                Body::Single(p) => builder.singlepart(p),
                Body::Multi(m) => builder.multipart(m),
            }
        } else {
            let mut mixed = match body {
                Body::Single(p) => MultiPart::mixed().singlepart(p),
                Body::Multi(m) => MultiPart::mixed().multipart(m),
            };
            for (i, a) in self.attachments.iter().enumerate() {
                let field = format!("attachments[{i}]");
                let bytes = B64
                    .decode(a.content.trim())
                    .map_err(|e| invalid(format!("{field}.content"), e.to_string()))?;
                let ct = ContentType::parse(
                    a.content_type
                        .as_deref()
                        .unwrap_or("application/octet-stream"),
                )
                .map_err(|e| invalid(format!("{field}.content_type"), e.to_string()))?;
                mixed = mixed.singlepart(MimeAttachment::new(a.filename.clone()).body(bytes, ct));
            }
            builder.multipart(mixed)
        }
        .map_err(|e| invalid("", format!("cannot build the message: {e}")))?;
        Ok(Built {
            from: from.email,
            recipients,
            raw: message.formatted(),
            message,
            message_id,
        })
    }
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

/// Whether two addresses are the same mailbox, compared without case: RFC 5321 lets a
/// server tell `Ada@` from `ada@`, but none that receives mail for people does, and sending
/// one person a message twice is the worse mistake.
pub(crate) fn same_address(a: &Address, b: &Address) -> bool {
    a.user().to_lowercase() == b.user().to_lowercase()
        && a.domain().eq_ignore_ascii_case(b.domain())
}

/// The plain-text version of an HTML body, wrapped at 78 columns.
pub fn html_to_text(html: &str) -> String {
    html2text::from_read(html.as_bytes(), 78).unwrap_or_else(|_| html.to_string())
}

/// Checks one custom header; the message never shows the value.
fn check_header(name: &str, value: &str) -> Result<(), String> {
    let valid_name = !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if !valid_name {
        return Err(format!(
            "`{name}` is not a valid header name (visible ASCII without `:`)"
        ));
    }
    if reserved_header(&name.to_ascii_lowercase()) {
        return Err(format!(
            "`{name}` is written by Conveyor from the message's fields; leave it out"
        ));
    }
    if value.len() > 998 || value.chars().any(|c| c.is_control() && c != '\t') {
        return Err("the value must be one line of at most 998 bytes".into());
    }
    Ok(())
}

/// Checks one attachment; returns its decoded size, or the field (inside the attachment)
/// and what is wrong.
fn check_attachment(a: &AttachmentArg, max: usize) -> Result<usize, (&'static str, String)> {
    if a.filename.trim().is_empty()
        || a.filename.chars().count() > 255
        || a.filename.chars().any(char::is_control)
        || a.filename.contains(['/', '\\'])
    {
        return Err((
            "filename",
            "give a file name of 1-255 characters, without `/`, `\\` or control characters".into(),
        ));
    }
    if let Some(ct) = &a.content_type
        && ContentType::parse(ct).is_err()
    {
        return Err((
            "content_type",
            format!("`{ct}` is not a MIME type such as application/pdf"),
        ));
    }
    // Decoded size from the base64 length, before decoding anything large.
    let estimate = a.content.trim().len() / 4 * 3;
    if estimate > max + 3 {
        return Err((
            "content",
            format!(
                "about {estimate} bytes; the limit (email.max_attachment_bytes) is {max} bytes"
            ),
        ));
    }
    let bytes = B64
        .decode(a.content.trim())
        .map_err(|e| ("content", format!("not standard base64: {e}")))?;
    if bytes.len() > max {
        return Err((
            "content",
            format!(
                "{} bytes; the limit (email.max_attachment_bytes) is {max} bytes",
                bytes.len()
            ),
        ));
    }
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::super::config::Transport;
    use super::*;

    fn config() -> EmailConfig {
        let mut c = EmailConfig::default();
        c.transports
            .insert("main".into(), Transport::new("smtp.example.com"));
        c.max_attachment_bytes = 16;
        c
    }

    fn args() -> EmailArgs {
        EmailArgs {
            from: "Zoë Support <support@example.com>".into(),
            to: vec!["Ada <ada@example.org>".into()],
            subject: "Grüße aus Köln".into(),
            html: Some("<p>Hello <b>Ada</b></p>".into()),
            ..EmailArgs::default()
        }
    }

    fn field(e: Error) -> String {
        match e {
            Error::InvalidInput { field, .. } => field,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn builds_an_ascii_message_with_a_stable_id() {
        let built = args().build(&config(), "0193-abc").unwrap();
        assert_eq!(built.message_id, "<0193-abc@example.com>");
        let text = String::from_utf8(built.raw.clone()).unwrap();
        assert!(built.raw.is_ascii(), "{text}");
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(
            text.contains("Message-ID: <0193-abc@example.com>"),
            "{text}"
        );
        assert!(!text.contains("Grüße"), "{text}");
        let again = args().build(&config(), "0193-abc").unwrap();
        assert_eq!(again.message_id, built.message_id);
    }

    #[test]
    fn bcc_is_in_the_envelope_only() {
        let mut a = args();
        a.bcc = vec!["hidden@example.net".into(), "ADA@EXAMPLE.ORG".into()];
        a.cc = vec![MailboxArg::Parts {
            email: "cc@example.org".into(),
            name: Some("Çedille".into()),
        }];
        let built = a.build(&config(), "j").unwrap();
        let text = String::from_utf8(built.raw).unwrap();
        assert!(!text.contains("hidden@example.net"), "{text}");
        let got: Vec<String> = built
            .recipients
            .iter()
            .map(|(a, _)| a.to_string())
            .collect();
        assert_eq!(
            got,
            ["ada@example.org", "cc@example.org", "hidden@example.net"]
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let c = config();
        let mut a = args();
        a.to.push("not an address".into());
        assert_eq!(field(a.check(&c).unwrap_err()), "to[1]");
        let mut a = args();
        a.headers.insert("Message-ID".into(), "<x@y>".into());
        assert_eq!(field(a.check(&c).unwrap_err()), "headers.Message-ID");
        let mut a = args();
        a.headers
            .insert("X-Campaign".into(), "a\r\nBcc: x@y".into());
        assert_eq!(field(a.check(&c).unwrap_err()), "headers.X-Campaign");
        let mut a = args();
        a.attachments.push(AttachmentArg {
            filename: "big.bin".into(),
            content_type: None,
            content: B64.encode([0u8; 17]),
        });
        let e = a.check(&c).unwrap_err();
        assert!(e.to_string().contains("max_attachment_bytes"), "{e}");
        assert_eq!(field(e), "attachments[0].content");
        let mut a = args();
        a.transport = Some("bulk".into());
        assert_eq!(field(a.check(&c).unwrap_err()), "transport");
        let mut a = args();
        a.html = None;
        assert_eq!(field(a.check(&c).unwrap_err()), "text");
        let mut a = args();
        a.subject = "two\nlines".into();
        assert_eq!(field(a.check(&c).unwrap_err()), "subject");
        let mut a = args();
        a.to.clear();
        assert_eq!(field(a.check(&c).unwrap_err()), "to");
    }
}
