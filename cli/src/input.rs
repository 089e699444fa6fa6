//! What the user typed: JSON flags (inline, `@file.json` or `@-` for stdin) and the error for
//! bad input, which exits with status 2 like clap's own usage errors.

use std::io::Read;

/// Bad input on the command line: what, where, how to fix it. Exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`, for `?` in commands.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// A JSON flag's value: `@path` reads the file, `@-` reads stdin, anything else is the JSON
/// itself. Large arguments do not fit a command line (or stay readable in shell history).
pub fn json_flag(flag: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    let Some(path) = text.strip_prefix('@') else {
        return serde_json::from_str(text).map_err(|e| {
            usage(format!(
                "{flag} is not valid JSON: {e}. Quote it for the shell, e.g. {flag} '{{\"msg\":\"hi\"}}', or read it from a file with {flag} @args.json"
            ))
        });
    };
    let (source, body) = if path == "-" {
        let mut body = String::new();
        std::io::stdin()
            .read_to_string(&mut body)
            .map_err(|e| usage(format!("{flag} @-: cannot read stdin: {e}")))?;
        ("stdin".to_string(), body)
    } else if path.is_empty() {
        return Err(usage(format!(
            "{flag} @: name a file after the @ (@args.json), or @- for stdin"
        )));
    } else {
        let body = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("{flag} @{path}: cannot read the file {path}: {e}")))?;
        (format!("the file {path}"), body)
    };
    serde_json::from_str(&body)
        .map_err(|e| usage(format!("{flag} @{path}: {source} is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_file_json() {
        assert_eq!(json_flag("--args", r#"{"n":1}"#).unwrap()["n"], 1);
        let path =
            std::env::temp_dir().join(format!("conveyor-args-{}.json", uuid::Uuid::now_v7()));
        std::fs::write(&path, r#"{"n":2}"#).unwrap();
        let flag = format!("@{}", path.display());
        assert_eq!(json_flag("--args", &flag).unwrap()["n"], 2);
        std::fs::write(&path, "{n").unwrap();
        let err = json_flag("--args", &flag).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = json_flag("--args", &flag).unwrap_err().to_string();
        assert!(err.contains("cannot read the file"), "{err}");
    }
}
