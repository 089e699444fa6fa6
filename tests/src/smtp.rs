//! A real SMTP server for the email tests: `tests/smtp/server.py` (aiosmtpd) on a free
//! loopback port, answering as the test's script says, and writing every message it accepts
//! (parsed back by Python's `email` package) to a folder the test reads. Killed and its
//! folder deleted on drop.
//!
//! The server needs Python with aiosmtpd: the project's `.venv` (`bash scripts/test-deps.sh`
//! installs it), or a `python3` that has it. Without one the test is skipped with the reason
//! printed, or fails under `CI=true`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// The workspace root (this crate's parent).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A Python that can import aiosmtpd.
pub fn python() -> Option<PathBuf> {
    let candidates = [
        workspace().join(".venv/bin/python"),
        PathBuf::from("python3"),
    ];
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// One received message, as the server wrote it.
#[derive(Clone, Debug)]
pub struct Received {
    /// `MAIL FROM`.
    pub mail_from: String,
    /// The accepted `RCPT TO`s of its transaction.
    pub rcpt_tos: Vec<String>,
    /// The message as sent.
    pub raw: String,
    /// Whether the connection was TLS.
    pub tls: bool,
    /// Whether the client authenticated.
    pub authenticated: bool,
    /// The message parsed back: `headers` (lowercased names, lists of decoded values),
    /// `subject`, `from`/`to`/`cc` (`name`, `address`), `content_type`, `parts`.
    pub parsed: Value,
}

impl Received {
    /// The first decoded value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.parsed["headers"][name.to_ascii_lowercase()][0].as_str()
    }

    /// The leaf parts with this content type.
    pub fn parts(&self, content_type: &str) -> Vec<&Value> {
        self.parsed["parts"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter(|x| x["content_type"] == content_type)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A running scripted server. See the module docs and `tests/smtp/server.py` for the script.
pub struct SmtpServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl SmtpServer {
    /// Starts a server answering as `script` says; `None` (skipped) without aiosmtpd.
    pub fn start(script: Value) -> Option<SmtpServer> {
        let Some(python) = python() else {
            return crate::unavailable(
                "no Python with aiosmtpd (run `bash scripts/test-deps.sh` to install it into .venv)",
            );
        };
        let dir =
            std::env::temp_dir().join(format!("conveyor-smtp-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(dir.join("out")).expect("temp dir is writable");
        let script_path = dir.join("script.json");
        std::fs::write(&script_path, script.to_string()).expect("temp dir is writable");
        let mut child = Command::new(python)
            .arg(workspace().join("tests/smtp/server.py"))
            .arg(&script_path)
            .arg(dir.join("out"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the SMTP server starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the SMTP server prints its port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the SMTP server printed {line:?}, not its port"));
        Some(SmtpServer { child, port, dir })
    }

    /// Every message accepted so far, in order.
    pub fn received(&self) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.join("out"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|p| {
                let v: Value = serde_json::from_str(
                    &std::fs::read_to_string(p).expect("a message file is readable"),
                )
                .expect("a message file is JSON");
                Received {
                    mail_from: v["mail_from"].as_str().unwrap_or_default().to_string(),
                    rcpt_tos: v["rcpt_tos"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    raw: v["raw"].as_str().unwrap_or_default().to_string(),
                    tls: v["tls"].as_bool().unwrap_or(false),
                    authenticated: v["authenticated"].as_bool().unwrap_or(false),
                    parsed: v["parsed"].clone(),
                }
            })
            .collect()
    }

    /// Every RCPT, DATA and AUTH the server answered, in order (`event`, and `address`,
    /// `rcpt_tos`, `answer`, `ok` as they apply).
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("out/events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Verifies the DKIM signature of `raw` with dkimpy (`tests/smtp/dkim_verify.py`), the
/// public keys looked up in `records` (`{"<selector>._domainkey.<domain>": "v=DKIM1; …"}`)
/// instead of DNS. Returns the verifier's verdict (`ok`, `domain`, `selector`, `algorithm`,
/// `error`); `None` (skipped, or failed under `CI=true`) without a Python with dkimpy.
pub fn dkim_verify(records: &Value, raw: &str) -> Option<Value> {
    let python = workspace().join(".venv/bin/python");
    let has_dkimpy = Command::new(&python)
        .args(["-c", "import dkim, nacl"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_dkimpy {
        return crate::unavailable(
            "no .venv with dkimpy (run `bash scripts/test-deps.sh` to install it)",
        );
    }
    let dir = std::env::temp_dir().join(format!("conveyor-dkim-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    std::fs::write(dir.join("records.json"), records.to_string()).expect("temp dir is writable");
    std::fs::write(dir.join("message.eml"), raw).expect("temp dir is writable");
    let out = Command::new(python)
        .arg(workspace().join("tests/smtp/dkim_verify.py"))
        .arg(dir.join("records.json"))
        .arg(dir.join("message.eml"))
        .stderr(Stdio::inherit())
        .output()
        .expect("the verifier runs");
    let _ = std::fs::remove_dir_all(&dir);
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the verifier printed {:?}, not its verdict: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    Some(verdict)
}
