//! Email templates: stored in the store, versioned, rendered with minijinja.
//!
//! A template is a subject and a text and/or HTML body, each a minijinja template. Creating a
//! template under a name that exists makes its next version; every version stays readable, and
//! a message names a version or takes the latest ([`TemplateRef`]). The HTML body is rendered
//! with HTML auto-escaping (a `{{ name }}` of `<b>` arrives as `&lt;b&gt;`; `|safe` opts
//! out), the subject and the text body without. Undefined variables are errors (minijinja's
//! strict mode): a message whose data lacks a variable the template uses is refused, never
//! sent with a blank.
//!
//! Each version is one record of the store's `email_templates` collection under
//! `<name>/<version, ten digits>`, so a name's versions list in order with one prefix query on
//! every backend, and two creators racing for the same next version are told apart by the
//! store's create-only write ([`Expect::Absent`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use conveyor_worker::store::meta::{Expect, MetaQuery, Put, list_all};
use conveyor_worker::{Error, Store};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::message::EmailArgs;

/// The collection of template versions.
pub const TEMPLATES: &str = "email_templates";
/// Longest template name.
pub const MAX_NAME: usize = 64;
/// Largest template part (subject, text or HTML), in bytes.
pub const MAX_SOURCE: usize = 256 * 1024;
/// How many times a create retries when another creator took the next version first.
const CREATE_TRIES: usize = 5;

/// A template to create (or the next version of one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTemplate {
    /// The name: 1 to 64 letters, digits, `_`, `-` or `.`, starting with a letter or digit.
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    pub name: String,
    /// The subject template (one line once rendered).
    #[schema(min_length = 1, pattern = r"^[^\r\n]*\S[^\r\n]*$")]
    pub subject: String,
    /// The plain-text body template (no escaping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The HTML body template (auto-escaped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// What the template is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Example data (a JSON object), used by the preview when it is given none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub sample_data: Option<Value>,
}

/// One stored version of a template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Template {
    /// The name.
    pub name: String,
    /// The version: 1 for the first, +1 for each later create under the name.
    pub version: u32,
    /// The subject template.
    pub subject: String,
    /// The plain-text body template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The HTML body template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// What the template is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Example data for the preview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub sample_data: Option<Value>,
    /// When this version was created.
    pub created_at: DateTime<Utc>,
}

/// A template as a listing shows it: its latest version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateSummary {
    /// The name.
    pub name: String,
    /// The latest version.
    pub latest_version: u32,
    /// How many versions are stored.
    pub versions: u32,
    /// The latest version's description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When the latest version was created.
    pub updated_at: DateTime<Utc>,
}

/// Which template a message is made from, and the data it is rendered with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateRef {
    /// The template's name.
    pub name: String,
    /// A version; absent: the latest when the email is sent (`POST /v1/emails` and `conveyor
    /// email send` pin the latest at enqueue, so every attempt renders the same message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The variables (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// A template rendered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rendered {
    /// The version rendered.
    pub version: u32,
    /// The subject.
    pub subject: String,
    /// The plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The HTML body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

/// The parts of a template, by the name minijinja knows each by: the `.html` one is
/// auto-escaped, the others are not.
const PARTS: [(&str, &str); 3] = [
    ("subject", "subject.txt"),
    ("text", "text.txt"),
    ("html", "html.html"),
];

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_debug(true);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env
}

/// `line L, column C` of a minijinja error in `source` (the column from the error's byte
/// range, when it has one).
fn position(e: &minijinja::Error, source: &str) -> String {
    let line = e.line().unwrap_or(1);
    let column = e.range().and_then(|r| {
        let start = r.start.min(source.len());
        let before = source.get(..start)?;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Some(before[line_start..].chars().count() + 1)
    });
    match column {
        Some(c) => format!("line {line}, column {c}"),
        None => format!("line {line}"),
    }
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// Checks a template name.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` must be 1 to {MAX_NAME} letters, digits, `_`, `-` or `.`, starting with a letter or digit (e.g. `welcome` or `receipt.v2`)"
        ))
    }
}

impl NewTemplate {
    /// The rules of a template: its name, a subject, at least one body, sizes, and every part
    /// parsing (a syntax error names the part, its line and column). `Err` names the field.
    pub fn check(&self) -> conveyor_worker::Result<()> {
        check_name(&self.name).map_err(|m| Error::invalid("name", m))?;
        if self.subject.trim().is_empty() {
            return Err(Error::invalid("subject", "give the subject template"));
        }
        if self.subject.contains(['\r', '\n']) {
            return Err(Error::invalid("subject", "must be one line"));
        }
        if self.text.is_none() && self.html.is_none() {
            return Err(Error::invalid("text", "give the body: text, html or both"));
        }
        if let Some(d) = &self.sample_data
            && !d.is_object()
        {
            return Err(Error::invalid(
                "sample_data",
                "must be a JSON object of the template's variables",
            ));
        }
        let env = environment();
        for (field, name) in PARTS {
            let Some(source) = self.part(field) else {
                continue;
            };
            if source.len() > MAX_SOURCE {
                return Err(Error::invalid(
                    field,
                    format!("{} bytes; at most {MAX_SOURCE}", source.len()),
                ));
            }
            if let Err(e) = env.template_from_named_str(name, source) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{} at {}; fix the template and create it again",
                        describe(&e),
                        position(&e, source)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn part(&self, field: &str) -> Option<&str> {
        match field {
            "subject" => Some(&self.subject),
            "text" => self.text.as_deref(),
            _ => self.html.as_deref(),
        }
    }
}

impl Template {
    fn part(&self, field: &str) -> Option<&str> {
        match field {
            "subject" => Some(&self.subject),
            "text" => self.text.as_deref(),
            _ => self.html.as_deref(),
        }
    }

    /// Renders every part with `data` (a JSON object). `Err` is bad input whose field is
    /// `data` (a variable missing, a value of the wrong shape) or the part whose rendering
    /// failed, with the line and column.
    pub fn render(&self, data: &Value) -> conveyor_worker::Result<Rendered> {
        if !data.is_object() {
            return Err(Error::invalid(
                "data",
                "must be a JSON object of the template's variables",
            ));
        }
        let env = environment();
        let mut out: BTreeMap<&str, String> = BTreeMap::new();
        for (field, name) in PARTS {
            let Some(source) = self.part(field) else {
                continue;
            };
            let template = env.template_from_named_str(name, source).map_err(|e| {
                Error::invalid(
                    field,
                    format!(
                        "template `{}` version {} does not parse: {} at {}",
                        self.name,
                        self.version,
                        describe(&e),
                        position(&e, source)
                    ),
                )
            })?;
            let missing: Vec<String> = {
                let mut names: Vec<String> = template
                    .undeclared_variables(false)
                    .into_iter()
                    .filter(|v| data.get(v).is_none() && env.globals().all(|(g, _)| g != v))
                    .collect();
                names.sort();
                names
            };
            if !missing.is_empty() {
                return Err(Error::invalid(
                    "data",
                    format!(
                        "template `{}` version {} uses {} in its {field}, which the data does not give",
                        self.name,
                        self.version,
                        missing
                            .iter()
                            .map(|m| format!("`{m}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            let rendered = template.render(data).map_err(|e| {
                let field_of = if e.kind() == minijinja::ErrorKind::UndefinedError {
                    "data"
                } else {
                    field
                };
                Error::invalid(
                    field_of,
                    format!(
                        "template `{}` version {}: {} in its {field} at {}",
                        self.name,
                        self.version,
                        describe(&e),
                        position(&e, source)
                    ),
                )
            })?;
            out.insert(field, rendered);
        }
        let subject = out.remove("subject").unwrap_or_default();
        if subject.contains(['\r', '\n']) {
            return Err(Error::invalid(
                "data",
                format!(
                    "template `{}` version {}: the rendered subject has a line break (from the data)",
                    self.name, self.version
                ),
            ));
        }
        Ok(Rendered {
            version: self.version,
            subject,
            text: out.remove("text"),
            html: out.remove("html"),
        })
    }
}

fn key(name: &str, version: u32) -> String {
    format!("{name}/{version:010}")
}

fn prefix(name: &str) -> String {
    format!("{name}/")
}

/// The latest version of `name`, if any.
async fn latest(store: &dyn Store, name: &str) -> conveyor_worker::Result<Option<Template>> {
    let page = store
        .meta_list(
            TEMPLATES,
            &MetaQuery {
                prefix: Some(prefix(name)),
                limit: 1,
                descending: true,
                ..MetaQuery::default()
            },
        )
        .await?;
    page.first().map(|r| r.decode()).transpose()
}

/// Creates `new` as the next version of its name (version 1 for a new name), after checking
/// it ([`NewTemplate::check`]).
pub async fn create(store: &dyn Store, new: NewTemplate) -> conveyor_worker::Result<Template> {
    new.check()?;
    for _ in 0..CREATE_TRIES {
        let version = latest(store, &new.name)
            .await?
            .map_or(1, |t| t.version.saturating_add(1));
        let template = Template {
            name: new.name.clone(),
            version,
            subject: new.subject.clone(),
            text: new.text.clone(),
            html: new.html.clone(),
            description: new.description.clone(),
            sample_data: new.sample_data.clone(),
            created_at: Utc::now(),
        };
        let value = serde_json::to_value(&template)?;
        let k = key(&new.name, version);
        match store
            .meta_put(Put::new(TEMPLATES, &k, &value).expect(Expect::Absent))
            .await
        {
            Ok(_) => return Ok(template),
            // Another create took this version first: take the next.
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflict(format!(
        "template `{}` is being created by others at the same time; try again",
        new.name
    )))
}

/// Version `version` of `name` (`None`: the latest); `Ok(None)` when there is none.
pub async fn get(
    store: &dyn Store,
    name: &str,
    version: Option<u32>,
) -> conveyor_worker::Result<Option<Template>> {
    if check_name(name).is_err() {
        return Ok(None);
    }
    match version {
        None => latest(store, name).await,
        Some(v) => match store.meta_get(TEMPLATES, &key(name, v)).await? {
            Some(r) => Ok(Some(r.decode()?)),
            None => Ok(None),
        },
    }
}

/// Every stored version of `name`, oldest first (empty when there is none).
pub async fn versions(store: &dyn Store, name: &str) -> conveyor_worker::Result<Vec<Template>> {
    if check_name(name).is_err() {
        return Ok(Vec::new());
    }
    let mut out: Vec<Template> = Vec::new();
    loop {
        let page = store
            .meta_list(
                TEMPLATES,
                &MetaQuery {
                    prefix: Some(prefix(name)),
                    after: out.last().map(|t| key(name, t.version)),
                    limit: 1000,
                    descending: false,
                },
            )
            .await?;
        let full = page.len() == 1000;
        for r in page {
            out.push(r.decode()?);
        }
        if !full {
            return Ok(out);
        }
    }
}

/// Every template by name, with its latest version.
pub async fn list(store: &dyn Store) -> conveyor_worker::Result<Vec<TemplateSummary>> {
    let mut out: Vec<TemplateSummary> = Vec::new();
    for r in list_all(store, TEMPLATES).await? {
        let t: Template = r.decode()?;
        match out.last_mut() {
            Some(s) if s.name == t.name => {
                s.versions += 1;
                if t.version >= s.latest_version {
                    s.latest_version = t.version;
                    s.description = t.description;
                    s.updated_at = t.created_at;
                }
            }
            _ => out.push(TemplateSummary {
                name: t.name,
                latest_version: t.version,
                versions: 1,
                description: t.description,
                updated_at: t.created_at,
            }),
        }
    }
    Ok(out)
}

/// Deletes version `version` of `name`, or every version (`None`); returns how many were
/// deleted (0: there was none).
pub async fn delete(
    store: &dyn Store,
    name: &str,
    version: Option<u32>,
) -> conveyor_worker::Result<u64> {
    let targets: Vec<u32> = match version {
        Some(v) => vec![v],
        None => versions(store, name)
            .await?
            .iter()
            .map(|t| t.version)
            .collect(),
    };
    let mut deleted = 0;
    for v in targets {
        if store
            .meta_delete(TEMPLATES, &key(name, v), Expect::Any)
            .await?
        {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// The message `args` names a template for, rendered: its subject and bodies filled in from
/// the template (and `template` cleared), with the version rendered. `Ok(None)` when the
/// message names no template. `Err` is bad input with the field inside the message
/// (`template.name`: no such template or version; `template.data`: a variable missing).
pub async fn render_message(
    store: &dyn Store,
    args: &EmailArgs,
) -> conveyor_worker::Result<Option<(EmailArgs, u32)>> {
    let Some(reference) = &args.template else {
        return Ok(None);
    };
    let Some(template) = get(store, &reference.name, reference.version).await? else {
        let what = match reference.version {
            Some(v) => format!("template `{}` has no version {v}", reference.name),
            None => format!("there is no template `{}`", reference.name),
        };
        let field =
            if reference.version.is_some() && latest(store, &reference.name).await?.is_some() {
                "template.version"
            } else {
                "template.name"
            };
        return Err(Error::invalid(
            field,
            format!("{what}; `conveyor email templates list` shows the templates"),
        ));
    };
    let empty = Value::Object(Default::default());
    let rendered = template
        .render(reference.data.as_ref().unwrap_or(&empty))
        .map_err(|e| match e {
            Error::InvalidInput { field, message } => Error::InvalidInput {
                field: format!("template.{field}"),
                message,
            },
            other => other,
        })?;
    let mut out = args.clone();
    out.subject = rendered.subject;
    out.text = rendered.text;
    out.html = rendered.html;
    out.template = None;
    Ok(Some((out, template.version)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(subject: &str, text: Option<&str>, html: Option<&str>) -> Template {
        Template {
            name: "t".into(),
            version: 1,
            subject: subject.into(),
            text: text.map(Into::into),
            html: html.map(Into::into),
            description: None,
            sample_data: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn a_syntax_error_names_the_part_line_and_column() {
        let new = NewTemplate {
            name: "welcome".into(),
            subject: "Hi {{ name }}".into(),
            html: Some("<p>Hello</p>\n<p>{{ name </p>".into()),
            ..NewTemplate::default()
        };
        let Err(Error::InvalidInput { field, message }) = new.check() else {
            panic!("accepted");
        };
        assert_eq!(field, "html");
        assert!(message.contains("line 2, column"), "{message}");
    }

    #[test]
    fn html_is_escaped_and_text_is_not() {
        let t = template(
            "For {{ name }}",
            Some("Hello {{ name }}"),
            Some("<p>Hello {{ name }}</p>"),
        );
        let r = t.render(&json!({"name": "<Ada & Co>"})).unwrap();
        assert_eq!(r.subject, "For <Ada & Co>");
        assert_eq!(r.text.as_deref(), Some("Hello <Ada & Co>"));
        assert_eq!(r.html.as_deref(), Some("<p>Hello &lt;Ada &amp; Co&gt;</p>"));
    }

    #[test]
    fn a_missing_variable_is_named() {
        let t = template("Hi", Some("{{ user.name }} {{ code }}"), None);
        let Err(Error::InvalidInput { field, message }) = t.render(&json!({"user": {}})) else {
            panic!("rendered");
        };
        assert_eq!(field, "data");
        assert!(message.contains("`code`"), "{message}");
        let Err(Error::InvalidInput { field, message }) = t.render(&json!({"user": {}, "code": 1}))
        else {
            panic!("rendered");
        };
        assert_eq!(field, "data", "{message}");
        assert!(message.contains("line 1"), "{message}");
    }
}
