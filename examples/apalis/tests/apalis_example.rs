//! The apalis example as a user runs it: `serve` (the whole platform) and the apalis worker
//! on one SQLite store; jobs enqueued from the CLI are run by the apalis handler, failures
//! retried with the kind's backoff and dead-lettered with every attempt's error, and SIGTERM
//! stops the apalis worker cleanly.

use std::process::Command;

use conveyor_tests::TestStore;
use conveyor_tests::process::Process;
use serde_json::Value;

fn example(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_apalis-example"));
    cmd.args(args)
        .arg("--database-url")
        .arg(url)
        .current_dir(std::env::temp_dir())
        .env("RUST_LOG", "info");
    for (k, _) in std::env::vars() {
        if k.starts_with("CONVEYOR_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn run_json(url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = example(url, &all).output().expect("the example runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "apalis-example {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn enqueue(url: &str, email: &str) -> String {
    let args = format!(r#"{{"email":"{email}"}}"#);
    let job = run_json(
        url,
        &[
            "enqueue",
            "--kind",
            "welcome.send",
            "--queue",
            "welcome",
            "--max-attempts",
            "3",
            "--args",
            &args,
        ],
    );
    job["id"].as_str().expect("an id").to_string()
}

fn wait_state(url: &str, id: &str, state: &str) -> Value {
    for _ in 0..300 {
        let job = run_json(url, &["jobs", "show", id]);
        if job["state"] == state {
            return job;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("job {id} never reached {state}");
}

#[test]
fn an_apalis_worker_runs_jobs_from_the_store_serve_uses() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(TestStore::sqlite());
    let url = store.url.clone();
    let mut serve = Process::spawn(example(&url, &["serve", "--listen", "127.0.0.1:0"]));
    serve.wait_for_line("listening on http://", 60);
    let mut worker = Process::spawn(example(&url, &["apalis-worker"]));
    let started = worker.wait_for_line("apalis worker started", 60);
    let worker_id = started
        .split("worker=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the worker names its lease owner")
        .to_string();

    // Completed by the apalis handler, through the application's own tower layer.
    let ok = enqueue(&url, "ada@example.com");
    worker.wait_for_line("welcome mail sent to ada@example.com", 30);
    worker.wait_for_line("task finished", 30);
    let job = wait_state(&url, &ok, "completed");
    assert_eq!(job["attempt"], 1, "{job}");
    assert_eq!(job["attempts"][0]["worker"], worker_id.as_str(), "{job}");

    // A handler error: retried with the kind's backoff, dead after the third attempt, each
    // attempt's error in the history.
    let bounced = enqueue(&url, "bounce@example.com");
    let job = wait_state(&url, &bounced, "dead");
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{job}");
    for a in attempts {
        assert_eq!(a["outcome"], "failed", "{job}");
        assert_eq!(
            a["error"], "mail server answered 451: try again later",
            "{job}"
        );
    }
    // apalis's AbortError: dead at once.
    let bad = enqueue(&url, "not-an-address");
    let job = wait_state(&url, &bad, "dead");
    assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    assert_eq!(
        job["attempts"][0]["error"], "`not-an-address` is not an email address",
        "{job}"
    );
    // The dead-letter queue lists both, as for any other kind.
    let dead = run_json(&url, &["dead", "list", "--queue", "welcome"]);
    let dead = dead.to_string();
    assert!(dead.contains(&bounced) && dead.contains(&bad), "{dead}");

    // SIGTERM: the apalis worker stops and exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    worker.wait_for_line("apalis worker stopped", 30);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(serve);
    rt.block_on(store.cleanup());
}
