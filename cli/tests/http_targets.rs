//! `http.request` as an operator sets it up and an application uses it: a signing secret
//! sealed with `conveyor secrets seal`, a target configured through the environment, a real
//! `conveyor serve` that refuses a job aimed outside the target over HTTP (422 naming
//! `args.url`), `conveyor enqueue` refusing the same (exit 2), and a job that reaches a real
//! receiver signed with the secret (checked with an independent HMAC) and completes, its
//! attempt log readable over the API without the target's credentials.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Process, conveyor, test_key};
use conveyor_api::audit::Actor;
use conveyor_api::key::{self, Scope};
use conveyor_tests::eventually;
use conveyor_tests::receiver::{Received, Receiver};
use conveyor_worker::{JobId, JobState, Store};
use hmac::{Hmac, Mac};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use sha2::Sha256;

cli_backend_tests!(a_target_from_config_through_serve_and_the_cli);

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `conveyor` with the secrets key and target `app` at the receiver's `/tasks/`.
fn with_target(url: &str, args: &[&str], rx: &Receiver, sealed: &str) -> Command {
    let mut cmd = conveyor(url, args);
    cmd.env("CONVEYOR_SECRETS__KEYS", test_key())
        .env("CONVEYOR_HTTP_TARGETS__APP__BASE_URL", rx.url("/tasks/"))
        .env("CONVEYOR_HTTP_TARGETS__APP__SIGNING_SECRET", sealed)
        .env(
            "CONVEYOR_HTTP_TARGETS__APP__ALLOW_CIDRS",
            r#"["127.0.0.0/8"]"#,
        )
        .env(
            "CONVEYOR_HTTP_TARGETS__APP__HEADERS__AUTHORIZATION",
            "Bearer app-token",
        );
    cmd
}

fn output(mut cmd: Command) -> (i32, String, String) {
    let out = tokio::task::block_in_place(|| cmd.output()).expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn signed_by(secret: &str, r: &Received) -> bool {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    let id = r.header("webhook-id").unwrap();
    let ts = r.header("webhook-timestamp").unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let want = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    r.header("webhook-signature")
        .unwrap_or_default()
        .split(' ')
        .any(|s| s == want)
}

async fn a_target_from_config_through_serve_and_the_cli(url: String, store: Arc<dyn Store>) {
    let rx = Receiver::start().await;

    // Seal the secret for the config; it opens only as this target's secret.
    let mut seal = conveyor(&url, &["secrets", "seal", "--for", "http_targets.app"]);
    seal.env("CONVEYOR_SECRETS__KEYS", test_key())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::block_in_place(|| {
        let mut child = seal.spawn().unwrap();
        writeln!(child.stdin.take().unwrap(), "{SECRET}").unwrap();
        child.wait_with_output().unwrap()
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "secrets seal failed: {stderr}");
    let sealed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        sealed.starts_with("cv1:") && !sealed.contains(SECRET),
        "{sealed}"
    );

    // The same value under another target does not open: a config error, exit 2.
    let mut other = conveyor(&url, &["enqueue", "--kind", "demo.echo"]);
    other
        .env("CONVEYOR_SECRETS__KEYS", test_key())
        .env(
            "CONVEYOR_HTTP_TARGETS__OTHER__BASE_URL",
            "https://o.example/",
        )
        .env("CONVEYOR_HTTP_TARGETS__OTHER__SIGNING_SECRET", &sealed);
    let (code, _, err) = output(other);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("http_targets.other.signing_secret"), "{err}");

    // The CLI refuses a job aimed outside its target, naming args.url; nothing is stored.
    let (code, _, err) = output(with_target(
        &url,
        &[
            "enqueue",
            "--kind",
            "http.request",
            "--args",
            r#"{"target": "app", "url": "https://evil.example/steal"}"#,
        ],
        &rx,
        &sealed,
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid args.url") && err.contains("may only reach URLs under"),
        "{err}"
    );

    // A real server with the same config: the API refuses it the same way.
    let mut serve = Process::spawn(with_target(
        &url,
        &["serve", "--listen", "127.0.0.1:0"],
        &rx,
        &sealed,
    ));
    let line = serve.wait_for_line("listening on http://", 30);
    let addr = line
        .split("listening on http://")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .to_string();
    let (_, api_key) = key::create(&store, "app", Scope::Admin, Actor::cli())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let req = http
            .post(format!("http://{addr}/v1/jobs"))
            .bearer_auth(&api_key)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, problem) = post(json!({
        "kind": "http.request",
        "args": {"target": "app", "url": "../admin"},
    }))
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "args.url", "{problem}");
    let batch = http
        .post(format!("http://{addr}/v1/jobs/batch"))
        .bearer_auth(&api_key)
        .json(&json!({"jobs": [
            {"kind": "http.request", "args": {"target": "app", "url": "fine"}},
            {"kind": "http.request", "args": {"target": "app", "url": "https://evil.example/"}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status().as_u16(), 422);
    let problem: Value = batch.json().await.unwrap();
    assert_eq!(
        problem["errors"][0]["field"], "jobs[1].args.url",
        "{problem}"
    );
    assert!(
        store
            .list(&Default::default(), Default::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing was enqueued"
    );

    // A job inside the target reaches the application, signed with the sealed secret.
    let (status, answer) = post(json!({
        "kind": "http.request",
        "args": {"target": "app", "url": "invoices/7/send", "body": {"invoice": 7}},
    }))
    .await;
    assert_eq!(status, 201, "{answer}");
    let id: JobId = answer["job"]["id"].as_str().unwrap().parse().unwrap();
    let got = eventually(30, "the request", || async {
        let got = rx.received("/tasks/invoices/7/send");
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert!(signed_by(SECRET, &got[0]), "{:?}", got[0].headers);
    assert_eq!(
        got[0].header("conveyor-job-id"),
        Some(id.to_string().as_str())
    );
    assert_eq!(got[0].header("authorization"), Some("Bearer app-token"));
    eventually(30, "the job to complete", || {
        let store = store.clone();
        async move {
            let j = store.get(id).await.unwrap()?;
            (j.state == JobState::Completed).then_some(())
        }
    })
    .await;
    // Its attempt log over the API: the status, the answer, the credential hidden.
    let log: Value = http
        .get(format!("http://{addr}/v1/jobs/{id}/http-attempts"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log[0]["status"], 200, "{log}");
    assert_eq!(log[0]["result"], "done", "{log}");
    assert_eq!(log[0]["target"], "app", "{log}");
    assert_eq!(log[0]["request_headers"]["authorization"], "***", "{log}");
    assert!(!log.to_string().contains("app-token"), "{log}");
    assert_eq!(serve.stop(Signal::SIGTERM, 30), Some(0));
    let logged = serve.seen.join("\n");
    assert!(
        !logged.contains("app-token") && !logged.contains(SECRET),
        "secrets stay out of the log"
    );
}
