//! Email as an operator sets it up and an application uses it: a transport configured
//! through the environment with a sealed password (`conveyor secrets seal --for
//! email.transports.<name>`), bad config stopping `serve` at start with the key named, bad
//! messages refused by `conveyor email send` (exit 2) and by `POST /v1/emails` (422) with the
//! same field, then a real `conveyor serve` sending through a real SMTP server
//! (`tests/smtp/server.py`) with AUTH, `Idempotency-Key` honoured, and the email read back
//! by `GET /v1/emails/{id}` and `conveyor email show --json` without the password.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{Process, conveyor, test_key};
use conveyor_api::audit::Actor;
use conveyor_api::key::{self, Scope};
use conveyor_tests::eventually;
use conveyor_tests::smtp::SmtpServer;
use conveyor_worker::Store;
use serde_json::{Value, json};

cli_backend_tests!(a_transport_from_config_through_serve_and_the_cli);

const PASSWORD: &str = "Sm7p-pa55word";

/// `conveyor` with the secrets key and transport `main` on the server, its password sealed.
fn with_transport(url: &str, args: &[&str], port: u16, sealed: &str) -> Command {
    let mut cmd = conveyor(url, args);
    cmd.env("CONVEYOR_SECRETS__KEYS", test_key())
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__HOST", "127.0.0.1")
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__PORT", port.to_string())
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__SECURITY", "none")
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__USERNAME", "app")
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__PASSWORD", sealed)
        .env("CONVEYOR_EMAIL__RETRY__BASE", "100ms")
        .env("CONVEYOR_EMAIL__RETRY__MAX", "100ms");
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

async fn a_transport_from_config_through_serve_and_the_cli(url: String, store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({
        "auth": {"user": "app", "password": PASSWORD},
        "rcpt": {"gone@example.org": [[550, "5.1.1 no such user"]]},
    })) else {
        return;
    };

    // Seal the password for the config; it opens only as this transport's password.
    let mut seal = conveyor(&url, &["secrets", "seal", "--for", "email.transports.main"]);
    seal.env("CONVEYOR_SECRETS__KEYS", test_key())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::block_in_place(|| {
        let mut child = seal.spawn().unwrap();
        writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
        child.wait_with_output().unwrap()
    });
    assert!(
        out.status.success(),
        "secrets seal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sealed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        sealed.starts_with("cv1:") && !sealed.contains(PASSWORD),
        "{sealed}"
    );

    // Bad config stops serve at start, naming the key (exit 2).
    let mut bad = with_transport(
        &url,
        &["serve", "--listen", "127.0.0.1:0"],
        server.port,
        &sealed,
    );
    bad.env("CONVEYOR_EMAIL__DEFAULT_TRANSPORT", "bulk");
    let (code, _, err) = output(bad);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("email.default_transport") && err.contains("main"),
        "{err}"
    );
    let mut bad = with_transport(
        &url,
        &["serve", "--listen", "127.0.0.1:0"],
        server.port,
        &sealed,
    );
    bad.env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__SECURITY", "ssl");
    let (code, _, err) = output(bad);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("email.transports.main.security"), "{err}");
    // The sealed password under another transport does not open.
    let mut bad = with_transport(
        &url,
        &["serve", "--listen", "127.0.0.1:0"],
        server.port,
        &sealed,
    );
    bad.env("CONVEYOR_EMAIL__TRANSPORTS__OTHER__HOST", "127.0.0.1")
        .env("CONVEYOR_EMAIL__TRANSPORTS__OTHER__USERNAME", "app")
        .env("CONVEYOR_EMAIL__TRANSPORTS__OTHER__PASSWORD", &sealed);
    let (code, _, err) = output(bad);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("email.transports.other.password"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");

    // A bad message is refused by the CLI, naming the field; nothing is stored.
    let send = |extra: &[&str]| {
        let mut args = vec![
            "email",
            "send",
            "--from",
            "Shop <shop@example.com>",
            "--subject",
            "Grüße",
            "--text",
            "Thanks",
        ];
        args.extend_from_slice(extra);
        with_transport(&url, &args, server.port, &sealed)
    };
    let (code, _, err) = output(send(&["--to", "not an address"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("to[0]"), "{err}");
    let (code, _, err) = output(send(&["--to", "a@example.org", "--transport", "bulk"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("transport") && err.contains("main"), "{err}");
    let (code, _, err) = output(send(&["--to", "a@example.org", "--header", "Bcc=x@y.z"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("headers.Bcc"), "{err}");

    // A real server with the same config.
    let mut serve = Process::spawn(with_transport(
        &url,
        &["serve", "--listen", "127.0.0.1:0"],
        server.port,
        &sealed,
    ));
    let line = serve.wait_for_line("listening on http://", 30);
    let addr = conveyor_tests::process::listening_addr(&line);
    let (_, api_key) = key::create(&store, "app", Scope::Admin, Actor::cli())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |body: Value, key: Option<&str>| {
        let mut req = http
            .post(format!("http://{addr}/v1/emails"))
            .bearer_auth(&api_key)
            .json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, problem) = post(
        json!({"from": "shop@example.com", "to": ["a@example.org", "nope"], "subject": "s", "text": "t"}),
        None,
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "to[1]", "{problem}");
    assert!(
        store
            .list(&Default::default(), Default::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing was enqueued"
    );

    // A good one, twice with the same key: one email, delivered once, with AUTH.
    let body = json!({
        "from": "Shop <shop@example.com>",
        "to": [{"email": "asa@example.org", "name": "Åsa Öberg"}],
        "subject": "Your receipt",
        "html": "<p>Thanks, <b>Åsa</b>!</p>",
        "tags": ["receipt"],
    });
    let (status, first) = post(body.clone(), Some("receipt-42")).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = post(body, Some("receipt-42")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["id"], first["id"]);
    let id = first["id"].as_str().unwrap().to_string();
    let view = eventually(30, "the email to be sent", || {
        let req = http
            .get(format!("http://{addr}/v1/emails/{id}"))
            .bearer_auth(&api_key);
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            (v["state"] == "completed").then_some(v)
        }
    })
    .await;
    assert_eq!(view["recipients"][0]["address"], "asa@example.org");
    assert_eq!(view["recipients"][0]["status"], "accepted");
    assert_eq!(view["recipients"][0]["code"], 250);
    assert_eq!(view["message"]["subject"], "Your receipt");
    assert_eq!(view["message_id"], format!("<{id}@example.com>"));
    assert_eq!(view["tags"], json!(["receipt"]));
    let got = server.received();
    assert_eq!(got.len(), 1, "one email for two sends with one key");
    assert!(got[0].authenticated);
    assert_eq!(got[0].parsed["to"][0]["name"], "Åsa Öberg");

    // A hard bounce; then the metrics count each recipient by transport and domain (a
    // domain neither throttled nor in `email.metrics_domains` is `other`).
    let (status, bounced) = post(
        json!({"from": "shop@example.com", "to": ["gone@example.org"], "subject": "s", "text": "t"}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{bounced}");
    let bounced_id = bounced["id"].as_str().unwrap().to_string();
    eventually(30, "the bounced email to be dead", || {
        let req = http
            .get(format!("http://{addr}/v1/emails/{bounced_id}"))
            .bearer_auth(&api_key);
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            (v["state"] == "dead").then_some(v)
        }
    })
    .await;
    let metrics = http
        .get(format!("http://{addr}/metrics"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (family, n) in [
        ("sent", 1),
        ("failed", 1),
        ("bounced", 1),
        ("deferred", 0),
        ("throttled", 0),
        ("suppressed", 0),
    ] {
        let line =
            format!("conveyor_emails_{family}_total{{transport=\"main\",domain=\"other\"}} {n}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
        assert!(metrics.contains(&format!("# TYPE conveyor_emails_{family}_total counter")));
    }

    // The CLI shows the same email; nothing shows the password.
    let (code, out, err) = output(with_transport(
        &url,
        &["email", "show", &id, "--json"],
        server.port,
        &sealed,
    ));
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["recipients"], view["recipients"]);
    assert_eq!(shown["state"], "completed");
    let (code, out, err) = output(with_transport(
        &url,
        &["email", "show", &id],
        server.port,
        &sealed,
    ));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("asa@example.org") && out.contains("accepted"),
        "{out}"
    );
    let text = format!("{view}{out}{}", serve.seen.join("\n"));
    assert!(!text.contains(PASSWORD) && !text.contains(&sealed));
    let (code, _, err) = output(with_transport(
        &url,
        &["email", "show", "0193b2c4-0000-7000-8000-000000000000"],
        server.port,
        &sealed,
    ));
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
    serve.stop(nix::sys::signal::Signal::SIGTERM, 30);
}
