//! The Python and Node worker libraries (`clients/python`, `clients/node`) against this
//! build's `conveyor serve`: each library's own suite runs with `CONVEYOR_BIN` set to this
//! binary. Each suite starts its own server (SQLite in a temporary folder, a free port) and
//! covers claiming, concurrency, batched outcomes, retries with the error and traceback in
//! the attempt history, permanent failure, snooze, heartbeats, cancel requests, a late outcome
//! after a lost lease, a worker killed with SIGKILL mid-job (its job rescued and completed by
//! another worker) and SIGTERM (the running job finishes, the process exits 0).
//!
//! Without `python3` or a Node of version 20.3 or later the suite is skipped with the reason
//! printed; under `CI=true` it fails instead.

use std::path::PathBuf;
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent folder")
        .to_path_buf()
}

/// The tool's `--version` output, or `None` (after printing why) when it is missing and this
/// is not CI.
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
        panic!("{reason}; CI needs it for the worker library suites");
    }
    eprintln!("skipped: {reason}");
}

/// Runs `program args` in the repository root with `CONVEYOR_BIN` set, and `CI=true` so a
/// suite that cannot find the binary fails instead of skipping.
fn run_suite(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .env("CONVEYOR_BIN", env!("CARGO_BIN_EXE_conveyor"))
        .env("CI", "true")
        .env_remove("RUST_LOG")
        .status()
        .unwrap_or_else(|e| panic!("{program} did not start: {e}"));
    assert!(
        status.success(),
        "`{program} {}` failed ({status}); its output is above",
        args.join(" ")
    );
}

#[test]
fn python_worker_library_suite() {
    if tool_version("python3").is_none() {
        return;
    }
    run_suite(
        "python3",
        &[
            "-m",
            "unittest",
            "discover",
            "-s",
            "clients/python/tests",
            "-v",
        ],
    );
}

#[test]
fn node_worker_library_suite() {
    let Some(version) = tool_version("node") else {
        return;
    };
    // `v20.3.0` → (20, 3): AbortSignal.any, which the library uses, came in 20.3.
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (20, 3) {
        missing(&format!("node {version} is older than 20.3"));
        return;
    }
    run_suite("node", &["--test", "clients/node/test/worker.test.js"]);
}
