//! Checks of a job's args at enqueue, per kind.
//!
//! A kind whose args can be refused before the job is stored registers a check here; the
//! enqueue operation every client path goes through (`conveyor_admin::Admin::enqueue`, used by
//! the HTTP API and by `conveyor enqueue`) runs the check of the job's kind, so bad args are
//! refused at enqueue (HTTP 422, CLI exit 2) rather than discovered when a worker runs the
//! job. Kinds without a check are accepted as before: the handler still decides at run time.
//!
//! A check answers with [`Error::InvalidInput`] whose `field` is a path inside the args
//! (`url`, `headers.x-tenant`, or empty for the args as a whole); [`ArgsValidators::check`]
//! puts `args.` before it, so every kind's refusals name their field the same way.
//!
//! ```
//! use conveyor_worker::validate::ArgsValidators;
//! use conveyor_worker::Error;
//! let mut checks = ArgsValidators::new();
//! checks.register("report.build", |args| match args.get("month") {
//!     Some(m) if m.is_string() => Ok(()),
//!     _ => Err(Error::invalid("month", "give the month as \"2026-11\"")),
//! });
//! let err = checks
//!     .check("report.build", &serde_json::json!({}))
//!     .unwrap_err()
//!     .to_string();
//! assert!(err.contains("args.month"), "{err}");
//! assert!(checks.check("other.kind", &serde_json::json!(1)).is_ok());
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::handler::Registry;

/// One kind's check: `Ok` accepts the args; [`Error::InvalidInput`] names a field inside them.
pub type ArgsCheck = dyn Fn(&serde_json::Value) -> Result<()> + Send + Sync;

/// The enqueue-time checks, one per kind. Cheap to clone (the checks are shared).
#[derive(Clone, Default)]
pub struct ArgsValidators {
    checks: HashMap<String, Arc<ArgsCheck>>,
}

impl std::fmt::Debug for ArgsValidators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArgsValidators")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl ArgsValidators {
    /// No checks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `kind`'s args with `check` (replacing an earlier check of the same kind).
    pub fn register<F>(&mut self, kind: &str, check: F) -> &mut Self
    where
        F: Fn(&serde_json::Value) -> Result<()> + Send + Sync + 'static,
    {
        self.checks.insert(kind.to_string(), Arc::new(check));
        self
    }

    /// Checks that `kind`'s args deserialize as `A` (the type its handler takes), naming
    /// serde's complaint.
    pub fn register_type<A: DeserializeOwned + 'static>(&mut self, kind: &str) -> &mut Self {
        let name = kind.to_string();
        self.register(kind, move |args| {
            <A as serde::Deserialize>::deserialize(args)
                .map(drop)
                .map_err(|e| Error::invalid("", format!("does not match kind `{name}`: {e}")))
        })
    }

    /// Also checks, for every kind `registry` has a handler for, that its args deserialize
    /// into the handler's args type ([`Registry::check_args`]), before that kind's own check
    /// if it has one: the enqueuing process has the types, so a mismatch is refused at
    /// enqueue rather than found by the worker that runs the job.
    pub fn check_types_of(&mut self, registry: &Registry) -> &mut Self {
        let registry = Arc::new(registry.clone());
        for kind in registry.kinds() {
            let own = self.checks.get(kind).cloned();
            let (name, types) = (kind.to_string(), registry.clone());
            self.register(kind, move |args| {
                types.check_args(&name, args).map_err(|e| match e {
                    // `check` names the field `args` itself.
                    Error::InvalidInput { message, .. } => Error::invalid("", message),
                    other => other,
                })?;
                own.as_ref().map_or(Ok(()), |check| check(args))
            });
        }
        self
    }

    /// Every check of `other` too (`other`'s win for a kind both check).
    pub fn extend(&mut self, other: &ArgsValidators) -> &mut Self {
        for (kind, check) in &other.checks {
            self.checks.insert(kind.clone(), check.clone());
        }
        self
    }

    /// Runs `kind`'s check, if it has one. A refusal's field is `args.<path>` (or `args`).
    pub fn check(&self, kind: &str, args: &serde_json::Value) -> Result<()> {
        let Some(check) = self.checks.get(kind) else {
            return Ok(());
        };
        check(args).map_err(|e| match e {
            Error::InvalidInput { field, message } => Error::InvalidInput {
                field: if field.is_empty() {
                    "args".to_string()
                } else {
                    format!("args.{field}")
                },
                message,
            },
            other => other,
        })
    }

    /// The kinds that have a check, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.checks.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Invoice {
        id: u64,
    }

    #[test]
    fn typed_check_names_args_and_unknown_kinds_pass() {
        let mut checks = ArgsValidators::new();
        checks.register_type::<Invoice>("invoice.send");
        assert!(
            checks
                .check("invoice.send", &serde_json::json!({"id": 7}))
                .is_ok()
        );
        let err = checks
            .check("invoice.send", &serde_json::json!({"id": "x"}))
            .unwrap_err();
        match err {
            Error::InvalidInput { field, message } => {
                assert_eq!(field, "args");
                assert!(message.contains("invoice.send"), "{message}");
            }
            other => panic!("{other}"),
        }
        assert!(checks.check("other", &serde_json::json!(null)).is_ok());
        assert_eq!(checks.kinds(), vec!["invoice.send"]);
    }
}
