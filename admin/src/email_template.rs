//! Email templates: `/v1/email-templates` and `conveyor email templates …` go through here.
//!
//! The rules (names, syntax checked with the line and column of an error, versions, strict
//! rendering) are `conveyor_jobs::email::template`'s; this layer adds the audit record of
//! each change and the not-found answers.

use conveyor_jobs::email::template::{self, NewTemplate, Rendered, Template, TemplateSummary};
use serde_json::{Value, json};

use crate::{Actor, Admin, Error, Result};

fn not_found(name: &str, version: Option<u32>) -> Error {
    Error::NotFound(match version {
        Some(v) => format!("email template `{name}` has no version {v}"),
        None => format!("no email template `{name}`"),
    })
}

impl Admin {
    /// Creates a template, or the next version of one with this name. Audited.
    pub async fn create_email_template(&self, actor: &Actor, new: NewTemplate) -> Result<Template> {
        let t = template::create(self.store.as_ref(), new).await?;
        self.audit(
            actor,
            "email.template.create",
            json!({ "email_template": t.name, "version": t.version }),
            1,
        )
        .await?;
        Ok(t)
    }

    /// Every template, with its latest version.
    pub async fn email_templates(&self) -> Result<Vec<TemplateSummary>> {
        Ok(template::list(self.store.as_ref()).await?)
    }

    /// Version `version` of template `name` (`None`: the latest). A version the template
    /// does not have is bad input naming `version` (the template exists); a name that does
    /// not exist is not found.
    pub async fn email_template(&self, name: &str, version: Option<u32>) -> Result<Template> {
        if let Some(t) = template::get(self.store.as_ref(), name, version).await? {
            return Ok(t);
        }
        match (version, template::get(self.store.as_ref(), name, None).await?) {
            (Some(v), Some(latest)) => Err(conveyor_worker::Error::invalid(
                "version",
                format!(
                    "email template `{name}` has no version {v}; its latest is {} (`conveyor email templates show {name} --versions` lists them)",
                    latest.version
                ),
            )
            .into()),
            _ => Err(not_found(name, None)),
        }
    }

    /// Every version of template `name`, oldest first.
    pub async fn email_template_versions(&self, name: &str) -> Result<Vec<Template>> {
        let all = template::versions(self.store.as_ref(), name).await?;
        if all.is_empty() {
            return Err(not_found(name, None));
        }
        Ok(all)
    }

    /// Renders version `version` (`None`: the latest) of `name` with `data`, or with the
    /// template's own sample data when `data` is `None`. A variable the data lacks is bad
    /// input naming `data`.
    pub async fn preview_email_template(
        &self,
        name: &str,
        version: Option<u32>,
        data: Option<Value>,
    ) -> Result<Rendered> {
        let t = self.email_template(name, version).await?;
        let data = data
            .or_else(|| t.sample_data.clone())
            .unwrap_or_else(|| json!({}));
        Ok(t.render(&data)?)
    }

    /// Deletes version `version` of `name`, or every version (`None`); messages already
    /// queued with it fail at delivery. Audited. Returns how many versions were deleted.
    pub async fn delete_email_template(
        &self,
        actor: &Actor,
        name: &str,
        version: Option<u32>,
    ) -> Result<u64> {
        let deleted = template::delete(self.store.as_ref(), name, version).await?;
        if deleted == 0 {
            return Err(not_found(name, version));
        }
        self.audit(
            actor,
            "email.template.delete",
            json!({ "email_template": name, "version": version }),
            deleted,
        )
        .await?;
        Ok(deleted)
    }
}
