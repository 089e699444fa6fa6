//! The admin dashboard in a real headless Chromium (`cli/tests/browser/test_dashboard.py`,
//! selenium over WebDriver) against this build's `conveyor serve`: sign in, find a dead job
//! by its error text, read its attempts, retry it and watch it complete without a reload,
//! bulk-purge after the dry-run count, pause a queue, a `read` key seeing no action and its
//! forged request refused, CSRF refusal, sign-out; axe-core scans every page.
//!
//! Needs Debian's `chromium` and `chromium-driver`, selenium in `.venv` and axe-core from npm
//! (`bash scripts/test-deps.sh` installs all four). Without them the test is skipped with the
//! reason printed; under `CI=true` it fails instead.
//!
//! `CONVEYOR_DASHBOARD_SCREENSHOTS=docs/dashboard cargo nextest run --workspace --test
//! dashboard` refreshes the screenshots of docs/dashboard.md.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent folder")
        .to_path_buf()
}

fn missing(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{reason}; CI needs it for the dashboard's browser tests (bash scripts/test-deps.sh)"
        );
    }
    eprintln!("skipped: {reason} (bash scripts/test-deps.sh installs it)");
}

/// axe-core's script, where scripts/test-deps.sh puts it.
fn axe_path() -> PathBuf {
    if let Ok(dir) = std::env::var("CONVEYOR_AXE_DIR") {
        return Path::new(&dir).join("node_modules/axe-core/axe.min.js");
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("conveyor/axe/node_modules/axe-core/axe.min.js")
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    for (path, what) in [
        (PathBuf::from("/usr/bin/chromium"), "chromium"),
        (
            PathBuf::from("/usr/bin/chromedriver"),
            "chromedriver (chromium-driver)",
        ),
        (python.clone(), ".venv's python"),
    ] {
        if !path.exists() {
            return missing(&format!("{what} is not at {}", path.display()));
        }
    }
    let selenium = Command::new(&python)
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    if !selenium {
        return missing("selenium is not installed in .venv");
    }
    let axe = axe_path();
    if !axe.exists() {
        return missing(&format!("axe-core is not at {}", axe.display()));
    }
    let status = Command::new(&python)
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "cli/tests/browser",
            "-v",
        ])
        .current_dir(&root)
        .env("CONVEYOR_BIN", env!("CARGO_BIN_EXE_conveyor"))
        .env("CONVEYOR_AXE", &axe)
        .env("CI", "true")
        .env_remove("RUST_LOG")
        .status()
        .expect("python starts");
    assert!(
        status.success(),
        "the dashboard's browser suite failed ({status}); its output is above"
    );
}
