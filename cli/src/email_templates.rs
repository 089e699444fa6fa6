//! `conveyor email templates create|list|show|preview|delete`: stored email templates, through
//! `conveyor_admin::Admin` as `/v1/email-templates` goes. See docs/email.md.

use clap::Subcommand;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use conveyor_admin::{Actor, Admin};
use conveyor_jobs::email::{NewTemplate, Rendered, Template};

use crate::input::usage;
use crate::output;

/// `email templates …`
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Create a template, or the next version of one with this name. Every part is parsed
    /// now; a syntax error names the part, its line and column (exit 2).
    Create {
        /// The name (letters, digits, `_`, `-`, `.`).
        name: String,
        /// The whole template as JSON (`@file.json`, `@-` for stdin): `subject`, `text`,
        /// `html`, `description`, `sample_data`; the flags below add to it.
        #[arg(long, value_name = "JSON")]
        template: Option<String>,
        /// The subject template.
        #[arg(long)]
        subject: Option<String>,
        /// The plain-text body template (`@file` reads a file).
        #[arg(long)]
        text: Option<String>,
        /// The HTML body template (`@file` reads a file), auto-escaped.
        #[arg(long)]
        html: Option<String>,
        /// What the template is for.
        #[arg(long)]
        description: Option<String>,
        /// Example data for the preview, a JSON object (`@file.json`).
        #[arg(long, value_name = "JSON")]
        sample_data: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every template with its latest version.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One version of a template (default: the latest), or every version.
    Show {
        /// The name.
        name: String,
        /// The version (default: the latest).
        #[arg(long, value_name = "N", conflicts_with = "versions")]
        template_version: Option<u32>,
        /// List every version.
        #[arg(long)]
        versions: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Render a template with data (default: its sample data).
    Preview {
        /// The name.
        name: String,
        /// The version (default: the latest).
        #[arg(long, value_name = "N")]
        template_version: Option<u32>,
        /// The variables, a JSON object (`@file.json`).
        #[arg(long, value_name = "JSON")]
        data: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete one version, or every version, of a template.
    Delete {
        /// The name.
        name: String,
        /// Only this version.
        #[arg(long, value_name = "N")]
        template_version: Option<u32>,
    },
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

fn print_template(t: &Template) {
    outln!("name:        {}", t.name);
    outln!("version:     {}", t.version);
    outln!("created:     {}", output::time(t.created_at));
    if let Some(d) = &t.description {
        outln!("description: {d}");
    }
    outln!("subject:     {}", t.subject);
    if let Some(text) = &t.text {
        outln!("--- text ---\n{text}");
    }
    if let Some(html) = &t.html {
        outln!("--- html ---\n{html}");
    }
}

fn print_rendered(r: &Rendered) {
    outln!("version: {}", r.version);
    outln!("subject: {}", r.subject);
    if let Some(text) = &r.text {
        outln!("--- text ---\n{text}");
    }
    if let Some(html) = &r.html {
        outln!("--- html ---\n{html}");
    }
}

/// Runs one `email templates` command.
pub async fn run(admin: &Admin, cmd: TemplateCommand) -> anyhow::Result<()> {
    match cmd {
        TemplateCommand::Create {
            name,
            template,
            subject,
            text,
            html,
            description,
            sample_data,
            json,
        } => {
            let mut new: NewTemplate = match template {
                Some(t) => {
                    let mut value = crate::input::json_flag("--template", &t)?;
                    if let Some(o) = value.as_object_mut() {
                        o.insert("name".into(), serde_json::Value::String(name.clone()));
                    }
                    serde_json::from_value(value)
                        .map_err(|e| usage(format!("--template is not a template: {e}")))?
                }
                None => NewTemplate {
                    name,
                    ..NewTemplate::default()
                },
            };
            if let Some(s) = subject {
                new.subject = s;
            }
            if let Some(t) = text {
                new.text = Some(crate::emails::text_flag("--text", &t)?);
            }
            if let Some(h) = html {
                new.html = Some(crate::emails::text_flag("--html", &h)?);
            }
            if let Some(d) = description {
                new.description = Some(d);
            }
            if let Some(d) = sample_data {
                new.sample_data = Some(crate::input::json_flag("--sample-data", &d)?);
            }
            let t = admin.create_email_template(&Actor::cli(), new).await?;
            if json {
                return output::json(&t);
            }
            outln!("template {} version {} created", t.name, t.version);
            Ok(())
        }
        TemplateCommand::List { json } => {
            let all = admin.email_templates().await?;
            if json {
                return output::json(&all);
            }
            if all.is_empty() {
                outln!("no email templates (create one with `conveyor email templates create`)");
                return Ok(());
            }
            let mut t = table(&["name", "latest", "versions", "updated", "description"]);
            for s in &all {
                t.add_row(vec![
                    s.name.clone(),
                    s.latest_version.to_string(),
                    s.versions.to_string(),
                    output::time(s.updated_at),
                    s.description.clone().unwrap_or_default(),
                ]);
            }
            outln!("{t}");
            Ok(())
        }
        TemplateCommand::Show {
            name,
            template_version: version,
            versions,
            json,
        } => {
            if versions {
                let all = admin.email_template_versions(&name).await?;
                if json {
                    return output::json(&all);
                }
                let mut t = table(&["version", "created", "subject", "description"]);
                for v in &all {
                    t.add_row(vec![
                        v.version.to_string(),
                        output::time(v.created_at),
                        v.subject.clone(),
                        v.description.clone().unwrap_or_default(),
                    ]);
                }
                outln!("{t}");
                return Ok(());
            }
            let t = admin.email_template(&name, version).await?;
            if json {
                return output::json(&t);
            }
            print_template(&t);
            Ok(())
        }
        TemplateCommand::Preview {
            name,
            template_version: version,
            data,
            json,
        } => {
            let data = data
                .map(|d| crate::input::json_flag("--data", &d))
                .transpose()?;
            let r = admin.preview_email_template(&name, version, data).await?;
            if json {
                return output::json(&r);
            }
            print_rendered(&r);
            Ok(())
        }
        TemplateCommand::Delete {
            name,
            template_version: version,
        } => {
            let n = admin
                .delete_email_template(&Actor::cli(), &name, version)
                .await?;
            outln!("deleted {n} version(s) of template {name}");
            Ok(())
        }
    }
}
