//! The README's walk-through, run top to bottom as a new user would: one `conveyor serve`
//! started the way the README says, then every command of the tour's code blocks in order,
//! against it, without restarting it. A command the README shows that fails, or an HTTP call
//! that answers an error, fails the test; so does a tour that no longer shows what the README
//! says it shows.
//!
//! The commands are taken from README.md itself, so the test follows the README as it changes:
//! `cargo run --release --` becomes the binary under test, `localhost:8080` the address `serve`
//! listens on, `127.0.0.1:9000` a receiver started here, and `<ID>`, `<EP_ID>`, `<EVT_ID>` the
//! job, endpoint and event ids the commands before them printed.

mod common;

use std::path::Path;
use std::process::Command;

use common::Process;

/// The shell commands of the tour: every `sh` block between "## Quick start" and the next
/// top-level section, except the block that starts the platform and runs the tests.
fn tour_commands(readme: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_tour = false;
    let mut block: Option<Vec<String>> = None;
    for line in readme.lines() {
        if line.starts_with("## ") {
            in_tour = line.trim() == "## Quick start";
            continue;
        }
        if !in_tour {
            continue;
        }
        match (&mut block, line.trim()) {
            (None, "```sh") => block = Some(Vec::new()),
            (Some(lines), "```") => {
                let text = lines.join("\n");
                if !text.contains("-- serve") && !text.contains("cargo test") {
                    commands.extend(join_continuations(lines));
                }
                block = None;
            }
            (Some(lines), _) => lines.push(line.to_string()),
            (None, _) => {}
        }
    }
    commands
}

/// One command per entry: lines ending in `\` joined to the next; blank lines and comments
/// dropped.
fn join_continuations(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in lines {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(without_comment(&std::mem::take(&mut current)));
            }
        }
    }
    out
}

/// The command without a trailing `# comment` (a `#` after a space, outside quotes).
fn without_comment(command: &str) -> String {
    let (mut single, mut double, mut previous) = (false, false, ' ');
    for (i, c) in command.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => {
                return command[..i].trim_end().to_string();
            }
            _ => {}
        }
        previous = c;
    }
    command.to_string()
}

/// The command as run here: the binary under test, this run's addresses (written in, since
/// some stand inside quoted JSON) and ids, and curl failing on an HTTP error instead of
/// printing it.
fn localize(command: &str, addr: &str, rx: &str) -> String {
    command
        .replace("cargo run --release --", "\"$CONVEYOR\"")
        .replace("localhost:8080", addr)
        .replace("127.0.0.1:9000", rx)
        .replace("curl -s ", "curl -sS --fail-with-body ")
        .replace("<ID>", "$ID")
        .replace("<EP_ID>", "$EP_ID")
        .replace("<EVT_ID>", "$EVT_ID")
}

/// A bash script that runs each command, prints it and its output, stops at the first
/// failure, and remembers the last ids printed.
fn script(commands: &[String], addr: &str, rx: &str) -> String {
    let mut s = String::from("set -u\nID=none EP_ID=none EVT_ID=none\n");
    s.push_str(
        "capture() {\n\
         \x20 local v\n\
         \x20 v=$(grep -oE '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}' <<<\"$1\" | tail -n1 || true); [ -n \"$v\" ] && ID=$v\n\
         \x20 v=$(grep -oE 'ep_[0-9A-Za-z]+' <<<\"$1\" | head -n1 || true); [ -n \"$v\" ] && EP_ID=$v\n\
         \x20 v=$(grep -oE 'evt_[0-9A-Za-z]+' <<<\"$1\" | head -n1 || true); [ -n \"$v\" ] && EVT_ID=$v\n\
         \x20 return 0\n\
         }\n",
    );
    for command in commands {
        let shown = command.replace('\'', "'\\''");
        let local = localize(command, addr, rx);
        // A person reads each answer before typing the next command; the jobs they started
        // meanwhile run.
        s.push_str("sleep 1\n");
        s.push_str(&format!("echo '$ {shown}'\n"));
        let assignment = local
            .split_once("=$(")
            .filter(|(name, _)| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        match assignment {
            Some((name, _)) => s.push_str(&format!(
                "{local} || {{ echo \"README command failed (exit $?): {shown}\"; exit 1; }}\n\
                 capture \"${name}\"\n"
            )),
            None => s.push_str(&format!(
                "out=$({local} 2>&1) || {{ rc=$?; printf '%s\\n' \"$out\"; echo \"README command failed (exit $rc): {shown}\"; exit 1; }}\n\
                 printf '%s\\n' \"$out\"\n\
                 capture \"$out\"\n"
            )),
        }
    }
    s
}

fn scratch_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("conveyor-readme-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `conveyor` in `dir` with only the environment a new user has.
fn clean(mut cmd: Command, dir: &Path) -> Command {
    cmd.current_dir(dir).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn the_readme_tour_works_top_to_bottom_against_one_serve() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md is at the repository root");
    let commands = tour_commands(&readme);
    assert!(
        commands.len() >= 15,
        "the tour has its commands: {commands:#?}"
    );

    // How the README says to start `serve` for the tour, on a port of its own.
    let serve_line = readme
        .lines()
        .find(|l| l.contains("-- serve") && l.contains("CONVEYOR_WEBHOOKS__ALLOW_CIDRS"))
        .expect("the README says how to start serve for the tour, receiver included");
    let cidrs = serve_line
        .split("CONVEYOR_WEBHOOKS__ALLOW_CIDRS=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|v| v.trim_matches('\'').to_string())
        .expect("the allow-list value");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let rx = rt.block_on(conveyor_tests::receiver::Receiver::start());
    let rx_addr = rx
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();

    let dir = scratch_dir();
    let mut serve = Process::spawn({
        let mut c = clean(Command::new(env!("CARGO_BIN_EXE_conveyor")), &dir);
        c.args(["serve", "--listen", "127.0.0.1:0"])
            .env("CONVEYOR_WEBHOOKS__ALLOW_CIDRS", &cidrs);
        c
    });
    let line = serve.wait_for_line("listening on http://", 30);
    let addr = line
        .split("listening on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    serve.wait_for_line("worker started", 30);

    let out = clean(Command::new("bash"), &dir)
        .arg("-c")
        .arg(script(&commands, &addr, &rx_addr))
        .env("CONVEYOR", env!("CARGO_BIN_EXE_conveyor"))
        .output()
        .expect("bash runs");
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{transcript}");
    assert!(out.status.success(), "the tour stopped:\n{transcript}");

    // What the tour says it shows.
    for shown in [
        "duplicate",               // the same idempotency key returns the same job
        "smtp refused",            // the failed job's error in the dead-letter listing
        "\"state\":\"completed\"", // the job enqueued over HTTP ran
        "whsec_",                  // an endpoint's signing secret
    ] {
        assert!(
            transcript.contains(shown),
            "the tour shows `{shown}`:\n{transcript}"
        );
    }
    assert!(
        !rx.received("/hooks").is_empty(),
        "the event reached the receiver:\n{transcript}"
    );
    assert_eq!(
        serve.stop(nix::sys::signal::Signal::SIGTERM, 30),
        Some(0),
        "{}",
        serve.seen.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
