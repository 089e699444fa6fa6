//! The minimal example as a user runs it: its own binary, `serve`, and its kind `greet`
//! enqueued from its CLI and over the API, run by its own handler; args that do not fit the
//! kind's type are refused at enqueue by both.

use std::process::Command;

use conveyor_tests::TestStore;
use conveyor_tests::process::{Process, listening_addr};
use serde_json::{Value, json};

fn minimal(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_minimal"));
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

fn run(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = minimal(url, args).output().expect("the example runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_json(url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = run(url, &all);
    assert_eq!(code, 0, "minimal {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Waits until job `id` is `state`.
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

#[tokio::test(flavor = "multi_thread")]
async fn the_minimal_app_runs_its_own_kind_and_refuses_args_that_do_not_fit() {
    let store = TestStore::sqlite().await;
    let url = store.url.clone();
    let mut serve = Process::spawn(minimal(&url, &["serve", "--listen", "127.0.0.1:0"]));
    let addr = listening_addr(&serve.wait_for_line("listening on http://", 60));
    serve.wait_for_line("worker started", 60);

    // From the application's own CLI: run by the application's own handler.
    let enqueued = run_json(
        &url,
        &["enqueue", "--kind", "greet", "--args", r#"{"name":"Ada"}"#],
    );
    let id = enqueued["id"].as_str().unwrap().to_string();
    let line = serve.wait_for_line("hello, Ada", 30);
    assert!(line.contains(&id), "the handler logs its job: {line}");
    let job = wait_state(&url, &id, "completed");
    assert_eq!(job["attempt"], 1, "{job}");
    assert_eq!(
        job["max_attempts"], 20,
        "the CLI's enqueue keeps its own default: {job}"
    );

    // Args that do not deserialize into `Greet` are refused at enqueue, naming `args`.
    let (code, _, err) = run(
        &url,
        &["enqueue", "--kind", "greet", "--args", r#"{"nme":"Ada"}"#],
    );
    assert_eq!(code, 2, "bad input: {err}");
    assert!(
        err.contains("invalid args: do not match kind `greet`") && err.contains("nme"),
        "{err}"
    );
    // Built-in kinds are checked the same way.
    let (code, _, err) = run(&url, &["enqueue", "--kind", "demo.echo", "--args", "{}"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing field `msg`"), "{err}");

    // Over the API of the same process: 422 naming `args`; good args run.
    let key = run_json(
        &url,
        &["keys", "create", "--scope", "enqueue", "--name", "test"],
    );
    let key = key["key"]
        .as_str()
        .expect("the key is shown once")
        .to_string();
    let http = reqwest::Client::new();
    let bad = http
        .post(format!("http://{addr}/v1/jobs"))
        .bearer_auth(&key)
        .json(&json!({"kind": "greet", "args": {"name": 7}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 422);
    let problem: Value = bad.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "args", "{problem}");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("name: invalid type: integer `7`, expected a string"),
        "{problem}"
    );
    let batch = http
        .post(format!("http://{addr}/v1/jobs/batch"))
        .bearer_auth(&key)
        .json(&json!({"jobs": [{"kind": "greet", "args": {"name": "Bo"}}, {"kind": "greet"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status().as_u16(), 422);
    let problem: Value = batch.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "jobs[1].args", "{problem}");

    let good = http
        .post(format!("http://{addr}/v1/jobs"))
        .bearer_auth(&key)
        .json(&json!({"kind": "greet", "args": {"name": "Grace"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status().as_u16(), 201);
    let answer: Value = good.json().await.unwrap();
    let id = answer["job"]["id"].as_str().unwrap().to_string();
    serve.wait_for_line("hello, Grace", 30);
    wait_state(&url, &id, "completed");
    drop(serve);
    store.cleanup().await;
}
