//! The own-jobs guide's walkthrough of handlers in three languages on one `serve`
//! (docs/own-jobs.md, section 12), run from the guide's own blocks as a newcomer would: the
//! Python and Node workers are written out from its code blocks, and its shell block runs
//! line by line, with `cargo run --bin minimal --` as this build's `minimal` binary. A block
//! that no longer works, or a walkthrough that no longer shows what the guide says it shows,
//! fails the test.
//!
//! Two substitutions, both for running beside other tests: `serve` listens on a free port
//! instead of 8080 (the workers' URL follows), and the guide's `pip install` / `npm install`
//! of the libraries from the checkout is replaced by pointing Python (`PYTHONPATH`) and Node
//! (a `node_modules/@conveyor/worker` link) at the same checkout folders, so the test needs
//! no network and leaves nothing installed.
//!
//! Needs `python3` and Node 20.3+; without them the test prints why and passes, except under
//! `CI=true`, where it fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use conveyor_tests::process::Process;
use serde_json::Value;

const SECTION: &str = "## 12. Handlers in Python, Node or any language, on the same server";
const APP: &str = "cargo run --bin minimal --";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether `program --version` runs (and what it says); under `CI=true` a missing tool fails.
fn tool_version(program: &str) -> Option<String> {
    let found = Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.is_none() {
        missing(&format!("`{program} --version` did not run"));
    }
    found
}

fn missing(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{reason}; CI needs it for the own-jobs walkthrough");
    }
    eprintln!("skipping the own-jobs walkthrough: {reason}");
}

/// The code blocks of the section, in order, as (language, text).
fn blocks(guide: &str) -> Vec<(String, String)> {
    let start = guide.find(SECTION).expect("the guide has its section 12");
    let rest = &guide[start + SECTION.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in section.lines() {
        match (&mut current, line.trim_end()) {
            (None, l) if l.starts_with("```") => current = Some((l[3..].to_string(), Vec::new())),
            (Some(_), "```") => {
                let (lang, lines) = current.take().expect("in a block");
                out.push((lang, lines.join("\n") + "\n"));
            }
            (Some((_, lines)), _) => lines.push(line),
            (None, _) => {}
        }
    }
    out
}

/// The block of `lang` whose first line names `file` (`# report_worker.py`, ...).
fn file_block<'a>(blocks: &'a [(String, String)], lang: &str, file: &str) -> &'a str {
    blocks
        .iter()
        .find(|(l, text)| l == lang && text.lines().next().is_some_and(|f| f.ends_with(file)))
        .map(|(_, text)| text.as_str())
        .unwrap_or_else(|| panic!("the guide's section 12 has no {lang} block for {file}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

struct Walk {
    dir: PathBuf,
    env: HashMap<String, String>,
    minimal: String,
    port: u16,
}

impl Walk {
    /// `line` as this test runs it: the application is this build's binary.
    fn shell(&self, line: &str) -> String {
        line.replace(APP, &format!("'{}'", self.minimal))
    }

    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).current_dir(&self.dir);
        for (k, _) in std::env::vars() {
            if k.starts_with("CONVEYOR_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(&self.env);
        cmd
    }

    fn run(&self, line: &str) -> String {
        let out = self.command(&self.shell(line)).output().expect("sh runs");
        assert!(
            out.status.success(),
            "the guide's `{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `… &` line: started in the background, its stdout read with its stderr.
    fn spawn(&self, line: &str) -> Process {
        let mut script = self.shell(line);
        if line.contains("-- serve") {
            script.push_str(&format!(" --listen 127.0.0.1:{}", self.port));
        }
        Process::spawn(self.command(&format!("exec {script} 1>&2")))
    }
}

#[test]
fn the_guide_runs_rust_python_and_node_handlers_on_one_serve() {
    let Some(_) = tool_version("python3") else {
        return;
    };
    let Some(node) = tool_version("node") else {
        return;
    };
    let (major, minor) = {
        let v = node.trim_start_matches('v');
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    if (major, minor) < (20, 3) {
        missing(&format!("node {node} is older than 20.3"));
        return;
    }

    let root = repo_root().canonicalize().expect("the checkout");
    let guide = std::fs::read_to_string(root.join("docs/own-jobs.md")).expect("the guide");
    let blocks = blocks(&guide);
    let port = free_port();
    let dir = std::env::temp_dir().join(format!(
        "conveyor-polyglot-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(dir.join("node_modules/@conveyor")).unwrap();
    let at_port = |text: &str| text.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    for (lang, file) in [
        ("python", "report_worker.py"),
        ("js", "thumbnail_worker.mjs"),
    ] {
        std::fs::write(dir.join(file), at_port(file_block(&blocks, lang, file))).unwrap();
    }

    // The install block, as the libraries are installed here instead (see the module docs).
    let shells: Vec<&str> = blocks
        .iter()
        .filter(|(l, _)| l == "sh")
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(shells.len(), 2, "an install block and the walkthrough");
    assert_eq!(
        shells[0].lines().collect::<Vec<_>>(),
        ["pip install ./clients/python", "npm install ./clients/node"],
        "the install block changed: change how this test stands in for it"
    );
    std::os::unix::fs::symlink(
        root.join("clients/node"),
        dir.join("node_modules/@conveyor/worker"),
    )
    .unwrap();

    let mut walk = Walk {
        dir: dir.clone(),
        env: HashMap::from([
            (
                "PYTHONPATH".to_string(),
                root.join("clients/python/src").display().to_string(),
            ),
            ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
            ("RUST_LOG".to_string(), "info".to_string()),
        ]),
        minimal: env!("CARGO_BIN_EXE_minimal").to_string(),
        port,
    };
    let mut background: Vec<(String, Process)> = Vec::new();
    for line in shells[1].lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(assign) = line.strip_prefix("export ") {
            let (name, value) = assign.split_once('=').expect("export NAME=VALUE");
            let inner = value
                .strip_prefix("$(")
                .and_then(|v| v.strip_suffix(')'))
                .expect("export NAME=$(command)");
            let out = walk.run(inner).trim().to_string();
            assert!(!out.is_empty(), "`{inner}` printed nothing");
            walk.env.insert(name.to_string(), out);
        } else if let Some(cmd) = line.strip_suffix('&') {
            let mut process = walk.spawn(cmd.trim());
            if cmd.contains("-- serve") {
                // What a newcomer sees before typing on: the server is up.
                process.wait_for_line("listening on http://", 60);
            }
            background.push((cmd.trim().to_string(), process));
        } else {
            walk.run(line);
        }
    }

    // What the guide says each shows.
    let mut shows = |program: &str, needle: &str| {
        let (_, p) = background
            .iter_mut()
            .find(|(cmd, _)| cmd.contains(program))
            .unwrap_or_else(|| panic!("the walkthrough starts no `{program}`"));
        p.wait_for_line(needle, 60)
    };
    shows("-- serve", "hello, Ada");
    shows("python3", "building the report for 2026-11");
    shows("node", "thumbnail of cat.png at 128px");

    // ... and all three jobs end `completed`.
    let mut jobs = Vec::new();
    for _ in 0..100 {
        let list: Value =
            serde_json::from_str(&walk.run(&format!("{APP} jobs list --json"))).expect("JSON");
        jobs = list
            .as_array()
            .or_else(|| list["jobs"].as_array())
            .cloned()
            .expect("a list of jobs");
        if jobs.len() == 3 && jobs.iter().all(|j| j["state"] == "completed") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut kinds: Vec<&str> = jobs
        .iter()
        .filter(|j| j["state"] == "completed")
        .filter_map(|j| j["kind"].as_str())
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["greet", "image.thumbnail", "report.build"],
        "{jobs:?}"
    );
    drop(background);
    let _ = std::fs::remove_dir_all(&dir);
}
