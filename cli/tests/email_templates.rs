//! Email templates as an operator and an application use them, through a real `conveyor
//! serve` and a real SMTP server (`tests/smtp/server.py`): templates created with the CLI and
//! the API, a syntax error refused with its line and column (exit 2 and 422), versions kept
//! and pinned, a preview with sample data, a message rendered and parsed back (HTML escaped,
//! text and subject not), and an unknown template or a missing variable refused at enqueue;
//! then an address suppressed by hand with `conveyor email suppressions add`, skipped by the
//! next email (recorded `suppressed`, not delivered), listed and removed. An `email.send`
//! job enqueued the generic way (`POST /v1/jobs`, `/v1/jobs/batch`, `conveyor enqueue`) is
//! checked as `POST /v1/emails` checks a message: unknown template, missing variable, bad
//! address, oversize attachment refused (422, exit 2), the template's version pinned.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{Process, conveyor};
use conveyor_api::audit::Actor;
use conveyor_api::key::{self, Scope};
use conveyor_tests::eventually;
use conveyor_tests::smtp::SmtpServer;
use conveyor_worker::Store;
use serde_json::{Value, json};

cli_backend_tests!(
    templates_through_the_cli_the_api_and_a_real_server,
    email_jobs_get_the_email_checks_on_every_enqueue_path
);

fn with_transport(url: &str, args: &[&str], port: u16) -> Command {
    let mut cmd = conveyor(url, args);
    cmd.env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__HOST", "127.0.0.1")
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__PORT", port.to_string())
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__SECURITY", "none");
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

async fn templates_through_the_cli_the_api_and_a_real_server(url: String, store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({})) else {
        return;
    };
    let cli = |args: &[&str]| output(with_transport(&url, args, server.port));

    // Created with the CLI: version 1.
    let (code, out, err) = cli(&[
        "email",
        "templates",
        "create",
        "welcome",
        "--subject",
        "Welcome, {{ name }}",
        "--text",
        "Hello {{ name }}, your code is {{ code }}.",
        "--html",
        "<p>Hello {{ name }}, your code is <b>{{ code }}</b>.</p>",
        "--sample-data",
        r#"{"name": "Sample", "code": "0000"}"#,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v1: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v1["version"], 1, "{v1}");

    // A syntax error: exit 2, the part, line and column named; nothing stored.
    let (code, _, err) = cli(&[
        "email",
        "templates",
        "create",
        "broken",
        "--subject",
        "Hi",
        "--html",
        "<p>one</p>\n<p>{{ name </p>",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("html") && err.contains("line 2, column"),
        "{err}"
    );
    let (code, out, err) = cli(&["email", "templates", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // The preview renders the sample data.
    let (code, out, err) = cli(&["email", "templates", "preview", "welcome", "--json"]);
    assert_eq!(code, 0, "{err}");
    let preview: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(preview["subject"], "Welcome, Sample");
    assert_eq!(preview["text"], "Hello Sample, your code is 0000.");
    // ... and refuses data that lacks a variable (exit 2, the variable named).
    let (code, _, err) = cli(&[
        "email",
        "templates",
        "preview",
        "welcome",
        "--data",
        r#"{"name": "Ada"}"#,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`code`"), "{err}");

    let mut serve = Process::spawn(with_transport(
        &url,
        &["serve", "--listen", "127.0.0.1:0"],
        server.port,
    ));
    let line = serve.wait_for_line("listening on http://", 30);
    let addr = conveyor_tests::process::listening_addr(&line);
    let (_, api_key) = key::create(&store, "app", Scope::Admin, Actor::cli())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("http://{addr}{path}"))
            .bearer_auth(&api_key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
    };
    use reqwest::Method;

    // Through the API: a syntax error is a 422 naming the field, with line and column.
    let (status, problem) = call(
        Method::POST,
        "/v1/email-templates",
        Some(json!({"name": "welcome", "subject": "Hi {% if %}", "text": "x"})),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "subject", "{problem}");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("line 1, column"),
        "{problem}"
    );
    // Version 2 under the same name; version 1 stays readable.
    let (status, v2) = call(
        Method::POST,
        "/v1/email-templates",
        Some(json!({
            "name": "welcome",
            "subject": "V2 welcome, {{ name }}",
            "html": "<h1>V2</h1><p>{{ name }}</p>",
        })),
    )
    .await;
    assert_eq!(status, 201, "{v2}");
    assert_eq!(v2["version"], 2);
    let (status, latest) = call(Method::GET, "/v1/email-templates/welcome", None).await;
    assert_eq!(status, 200);
    assert_eq!(latest["version"], 2);
    let (_, first) = call(Method::GET, "/v1/email-templates/welcome?version=1", None).await;
    assert_eq!(first["subject"], "Welcome, {{ name }}");
    let (_, versions) = call(Method::GET, "/v1/email-templates/welcome/versions", None).await;
    assert_eq!(versions.as_array().unwrap().len(), 2, "{versions}");
    let (status, preview) = call(
        Method::POST,
        "/v1/email-templates/welcome/preview",
        Some(json!({"version": 1, "data": {"name": "<Ada>", "code": "7"}})),
    )
    .await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(
        preview["html"],
        "<p>Hello &lt;Ada&gt;, your code is <b>7</b>.</p>"
    );
    let (status, _) = call(Method::GET, "/v1/email-templates/nope", None).await;
    assert_eq!(status, 404);

    // Sending: a name the store lacks, and data without a variable, are refused at enqueue.
    let send = |template: Value| {
        call(
            Method::POST,
            "/v1/emails",
            Some(json!({
                "from": "Shop <shop@example.com>",
                "to": ["ada@example.org"],
                "template": template,
            })),
        )
    };
    let (status, problem) = send(json!({"name": "nope", "data": {}})).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "template.name", "{problem}");
    let (status, problem) =
        send(json!({"name": "welcome", "version": 1, "data": {"name": "Ada"}})).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "template.data", "{problem}");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("`code`"),
        "{problem}"
    );
    let (status, problem) = send(json!({"name": "welcome", "version": 9, "data": {}})).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(
        problem["errors"][0]["field"], "template.version",
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

    // Version 1 pinned: rendered and parsed back, HTML escaped, text and subject not.
    let data = json!({"name": "Åsa & <Bob>", "code": "<42>"});
    let (status, sent) = send(json!({"name": "welcome", "version": 1, "data": data})).await;
    assert_eq!(status, 202, "{sent}");
    let id = sent["id"].as_str().unwrap().to_string();
    // The latest (version 2) is pinned at enqueue, from the CLI.
    let (code, out, err) = cli(&[
        "email",
        "send",
        "--from",
        "shop@example.com",
        "--to",
        "bob@example.org",
        "--template",
        "welcome",
        "--data",
        r#"{"name": "Bob"}"#,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let id2 = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let job2 = store.get(id2.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(job2.args["template"]["version"], 2, "{}", job2.args);
    for id in [&id, &id2] {
        eventually(30, "the email to be sent", || {
            let req = http
                .get(format!("http://{addr}/v1/emails/{id}"))
                .bearer_auth(&api_key);
            async move {
                let v: Value = req.send().await.unwrap().json().await.unwrap();
                (v["state"] == "completed").then_some(v)
            }
        })
        .await;
    }
    let got = server.received();
    assert_eq!(got.len(), 2);
    let ada = got
        .iter()
        .find(|r| r.rcpt_tos[0] == "ada@example.org")
        .unwrap();
    assert_eq!(ada.parsed["subject"], "Welcome, Åsa & <Bob>");
    let html = ada.parts("text/html")[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        html.contains("Hello Åsa &amp; &lt;Bob&gt;, your code is <b>&lt;42&gt;</b>."),
        "{html}"
    );
    let text = ada.parts("text/plain")[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains("Hello Åsa & <Bob>, your code is <42>."),
        "{text}"
    );
    let bob = got
        .iter()
        .find(|r| r.rcpt_tos[0] == "bob@example.org")
        .unwrap();
    assert_eq!(bob.parsed["subject"], "V2 welcome, Bob");
    assert!(
        bob.parts("text/html")[0]["text"]
            .as_str()
            .unwrap()
            .contains("<h1>V2</h1>")
    );

    // Deleting version 2 leaves version 1 as the latest; deleting the rest removes the name.
    let (status, _) = call(
        Method::DELETE,
        "/v1/email-templates/welcome?version=2",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (code, out, err) = cli(&["email", "templates", "show", "welcome", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["version"], 1);
    let (code, _, err) = cli(&["email", "templates", "delete", "welcome"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = cli(&["email", "templates", "show", "welcome"]);
    assert_ne!(code, 0);

    // A manual suppression from the CLI: the next email skips the address, never sends it.
    let (code, _, err) = cli(&["email", "suppressions", "add", "not an address"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("address"), "{err}");
    let (code, _, err) = cli(&[
        "email",
        "suppressions",
        "add",
        "Ada@Example.org",
        "--detail",
        "asked by phone",
    ]);
    assert_eq!(code, 0, "{err}");
    let (status, sent) = call(
        Method::POST,
        "/v1/emails",
        Some(json!({"from": "shop@example.com", "to": ["ada@example.org"], "subject": "s", "text": "t"})),
    )
    .await;
    assert_eq!(status, 202, "{sent}");
    let id = sent["id"].as_str().unwrap().to_string();
    let view = eventually(30, "the email to finish", || {
        let req = http
            .get(format!("http://{addr}/v1/emails/{id}"))
            .bearer_auth(&api_key);
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            (v["state"] == "completed").then_some(v)
        }
    })
    .await;
    assert_eq!(view["recipients"][0]["status"], "suppressed", "{view}");
    assert!(
        view["recipients"][0]["reply"]
            .as_str()
            .unwrap()
            .contains("manual"),
        "{view}"
    );
    assert_eq!(server.received().len(), 2, "nothing more was delivered");
    let (status, list) = call(Method::GET, "/v1/email-suppressions", None).await;
    assert_eq!(status, 200);
    assert_eq!(list[0]["address"], "ada@example.org", "{list}");
    assert_eq!(list[0]["reason"], "manual");
    let (code, out, err) = cli(&["email", "suppressions", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), list);
    let (code, _, err) = cli(&["email", "suppressions", "remove", "ada@example.org"]);
    assert_eq!(code, 0, "{err}");
    let (status, list) = call(Method::GET, "/v1/email-suppressions", None).await;
    assert_eq!(status, 200);
    assert_eq!(list, json!([]));
    serve.stop(nix::sys::signal::Signal::SIGTERM, 30);
}

async fn email_jobs_get_the_email_checks_on_every_enqueue_path(url: String, store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({})) else {
        return;
    };
    let with_limit = |args: &[&str]| {
        let mut cmd = with_transport(&url, args, server.port);
        cmd.env("CONVEYOR_EMAIL__MAX_ATTACHMENT_BYTES", "16");
        cmd
    };
    let (code, _, err) = output(with_limit(&[
        "email",
        "templates",
        "create",
        "welcome",
        "--subject",
        "Welcome, {{ name }}",
        "--text",
        "Hello {{ name }}, your code is {{ code }}.",
    ]));
    assert_eq!(code, 0, "{err}");
    let mut serve = Process::spawn(with_limit(&["serve", "--listen", "127.0.0.1:0"]));
    let line = serve.wait_for_line("listening on http://", 30);
    let addr = conveyor_tests::process::listening_addr(&line);
    let (_, api_key) = key::create(&store, "app", Scope::Admin, Actor::cli())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let req = http
            .post(format!("http://{addr}{path}"))
            .bearer_auth(&api_key)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let message = |change: Value| {
        let mut m = json!({
            "from": "shop@example.com",
            "to": ["ada@example.org"],
            "template": {"name": "welcome", "data": {"name": "Ada", "code": "1234"}},
        });
        for (k, v) in change.as_object().unwrap() {
            m[k] = v.clone();
        }
        m
    };
    use base64::Engine;
    let big = base64::engine::general_purpose::STANDARD.encode([7u8; 17]);
    let bad = [
        (
            message(json!({"template": {"name": "nope"}})),
            "args.template.name",
        ),
        (
            message(json!({"template": {"name": "welcome", "version": 9}})),
            "args.template.version",
        ),
        (
            message(json!({"template": {"name": "welcome", "data": {"name": "Ada"}}})),
            "args.template.data",
        ),
        (message(json!({"to": ["not an address"]})), "args.to[0]"),
        (
            message(json!({"attachments": [{"filename": "a.bin", "content": big}]})),
            "args.attachments[0]",
        ),
    ];
    for (args, field) in &bad {
        // Over HTTP, one job and in a batch: 422 naming the field inside the args.
        let (status, problem) = post("/v1/jobs", json!({"kind": "email.send", "args": args})).await;
        assert_eq!(status, 422, "{args}: {problem}");
        let got = problem["errors"][0]["field"].as_str().unwrap();
        assert!(got.starts_with(field), "{args}: {field} in {problem}");
        if *field == "args.template.data" {
            assert!(
                problem["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .contains("`code`"),
                "{problem}"
            );
        }
        let (status, problem) = post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "email.send", "args": message(json!({}))}, {"kind": "email.send", "args": args}]}),
        )
        .await;
        assert_eq!(status, 422, "{args}: {problem}");
        let got = problem["errors"][0]["field"].as_str().unwrap();
        assert!(got.starts_with(&format!("jobs[1].{field}")), "{problem}");
        // The CLI's generic enqueue: exit 2 with the same field.
        let (code, _, err) = output(with_limit(&[
            "enqueue",
            "--kind",
            "email.send",
            "--args",
            &args.to_string(),
        ]));
        assert_eq!(code, 2, "{args}: {err}");
        assert!(err.contains(field), "{field} in {err}");
    }
    assert!(
        store
            .list(&Default::default(), Default::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing was enqueued"
    );

    // A good one through POST /v1/jobs: the version rendered is pinned, and it is sent.
    let (status, job) = post(
        "/v1/jobs",
        json!({"kind": "email.send", "args": message(json!({}))}),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["job"]["args"]["template"]["version"], 1, "{job}");
    let id: conveyor_worker::JobId = job["job"]["id"].as_str().unwrap().parse().unwrap();
    let stored = store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.args["template"]["version"], 1, "{}", stored.args);
    assert_eq!(stored.args["template"]["data"]["code"], "1234");
    let (code, _, err) = output(with_limit(&[
        "enqueue",
        "--kind",
        "email.send",
        "--args",
        &message(json!({"to": ["bo@example.org"]})).to_string(),
    ]));
    assert_eq!(code, 0, "{err}");
    eventually(30, "both emails to be sent", || {
        let n = server.received().len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    let got = server.received();
    assert!(
        got.iter()
            .all(|r| r.header("Subject") == Some("Welcome, Ada")),
        "{got:?}"
    );
    serve.stop(nix::sys::signal::Signal::SIGTERM, 30);
}
