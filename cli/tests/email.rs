//! Email as an operator sets it up and an application uses it: a transport configured
//! through the environment with a sealed password (`conveyor secrets seal --for
//! email.transports.<name>`), bad config stopping `serve` at start with the key named, bad
//! messages refused by `conveyor email send` (exit 2) and by `POST /v1/emails` (422) with the
//! same field, then a real `conveyor serve` sending through a real SMTP server
//! (`tests/smtp/server.py`) with AUTH, `Idempotency-Key` honoured, and the email read back
//! by `GET /v1/emails/{id}` and `conveyor email show --json` without the password. One-click
//! unsubscribe (RFC 8058) end to end: each recipient's own link read from the message the
//! SMTP server received, opened (`GET`: a page, nothing changed) and posted without an API
//! key, the address then skipped for that list only, a forged link refused.

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

cli_backend_tests!(
    a_transport_from_config_through_serve_and_the_cli,
    one_click_unsubscribe_through_serve
);

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

/// The link in a received message's `List-Unsubscribe: <…>`.
fn unsubscribe_link(r: &conveyor_tests::smtp::Received) -> String {
    let value = r
        .header("List-Unsubscribe")
        .unwrap_or_else(|| panic!("no List-Unsubscribe in\n{}", r.raw));
    value
        .trim()
        .strip_prefix('<')
        .and_then(|v| v.strip_suffix('>'))
        .unwrap_or_else(|| panic!("List-Unsubscribe is not <url>: {value}"))
        .to_string()
}

async fn one_click_unsubscribe_through_serve(url: String, store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({})) else {
        return;
    };
    const PUBLIC: &str = "https://links.example.test";
    let mut cmd = conveyor(&url, &["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("CONVEYOR_SECRETS__KEYS", test_key())
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__HOST", "127.0.0.1")
        .env(
            "CONVEYOR_EMAIL__TRANSPORTS__MAIN__PORT",
            server.port.to_string(),
        )
        .env("CONVEYOR_EMAIL__TRANSPORTS__MAIN__SECURITY", "none")
        .env("CONVEYOR_EMAIL__PUBLIC_URL", format!("{PUBLIC}/"));
    let mut serve = Process::spawn(cmd);
    let line = serve.wait_for_line("listening on http://", 30);
    let addr = conveyor_tests::process::listening_addr(&line);
    let (_, api_key) = key::create(&store, "app", Scope::Admin, Actor::cli())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let send = |to: &[&str], list: Option<&str>| {
        let mut body = json!({"from": "News <news@example.com>", "to": to, "subject": "News", "text": "Hello"});
        if let Some(l) = list {
            body["list"] = json!(l);
        }
        let req = http
            .post(format!("http://{addr}/v1/emails"))
            .bearer_auth(&api_key)
            .json(&body);
        let http = http.clone();
        let api_key = api_key.clone();
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let id = r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
            eventually(30, "the email to complete", || {
                let req = http
                    .get(format!("http://{addr}/v1/emails/{id}"))
                    .bearer_auth(&api_key);
                async move {
                    let v: Value = req.send().await.unwrap().json().await.unwrap();
                    (v["state"] == "completed").then_some(v)
                }
            })
            .await
        }
    };

    // Each recipient of a listed message gets its own copy with its own link.
    send(&["ada@example.org", "bo@example.org"], Some("newsletter")).await;
    let got = server.received();
    assert_eq!(got.len(), 2, "{got:?}");
    let mut links = std::collections::HashMap::new();
    for r in &got {
        assert_eq!(r.rcpt_tos.len(), 1, "one copy per recipient");
        assert_eq!(
            r.header("List-Unsubscribe-Post"),
            Some("List-Unsubscribe=One-Click")
        );
        let link = unsubscribe_link(r);
        assert!(
            link.starts_with(&format!("{PUBLIC}/v1/unsubscribe/")),
            "{link}"
        );
        links.insert(r.rcpt_tos[0].clone(), link);
    }
    assert_ne!(links["ada@example.org"], links["bo@example.org"]);
    let local = |link: &str| link.replace(PUBLIC, &format!("http://{addr}"));
    let ada = local(&links["ada@example.org"]);
    let suppressions = || {
        let req = http
            .get(format!("http://{addr}/v1/email-suppressions"))
            .bearer_auth(&api_key);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };

    // Opening the link (as a scanner would) changes nothing: a page whose button POSTs.
    let page = http.get(&ada).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = page.text().await.unwrap();
    assert!(
        page.contains("method=\"post\"")
            && page.contains("ada@example.org")
            && page.contains("newsletter"),
        "{page}"
    );
    assert_eq!(suppressions().await, json!([]), "GET unsubscribed nobody");

    // The one-click POST, as a mail client sends it, without an API key; twice.
    for _ in 0..2 {
        let r = http
            .post(&ada)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.text().await.unwrap().contains("ada@example.org"));
    }
    let list = suppressions().await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["address"], "ada@example.org");
    assert_eq!(list[0]["list"], "newsletter");
    assert_eq!(list[0]["reason"], "unsubscribe");
    let audit: Value = http
        .get(format!("http://{addr}/v1/audit?limit=50"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "email.unsubscribe")
        .collect();
    assert_eq!(entries.len(), 1, "audited once: {audit}");
    assert_eq!(entries[0]["target"]["address"], "ada@example.org");

    // A forged link: Bo's address under Ada's signature, and a made-up token.
    use base64::Engine;
    let token = ada.rsplit('/').next().unwrap().to_string();
    let (_, rest) = token.split_once('.').unwrap();
    let forged = format!(
        "{}.{rest}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("bo@example.org\nnewsletter")
    );
    for bad in [forged.as_str(), "not-a-token"] {
        for method in [reqwest::Method::POST, reqwest::Method::GET] {
            let r = http
                .request(
                    method.clone(),
                    format!("http://{addr}/v1/unsubscribe/{bad}"),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 422, "{method} {bad}");
            let problem: Value = r.json().await.unwrap();
            assert_eq!(problem["errors"][0]["field"], "token", "{problem}");
        }
    }
    assert_eq!(suppressions().await.as_array().unwrap().len(), 1);

    // The next newsletter skips Ada, with the reason; Bo still gets it; Ada still gets the
    // mail of another list and mail of no list.
    let view = send(&["ada@example.org", "bo@example.org"], Some("newsletter")).await;
    assert_eq!(view["recipients"][0]["status"], "suppressed", "{view}");
    assert!(
        view["recipients"][0]["reply"]
            .as_str()
            .unwrap()
            .contains("unsubscribe"),
        "{view}"
    );
    assert_eq!(view["recipients"][1]["status"], "accepted", "{view}");
    send(&["ada@example.org"], Some("offers")).await;
    send(&["ada@example.org"], None).await;
    let got = server.received();
    let tos: Vec<&str> = got[2..].iter().map(|r| r.rcpt_tos[0].as_str()).collect();
    assert_eq!(
        tos,
        ["bo@example.org", "ada@example.org", "ada@example.org"]
    );
    assert!(
        unsubscribe_link(&got[3]).starts_with(PUBLIC),
        "the offers list has its link"
    );
    assert!(
        got[4].header("List-Unsubscribe").is_none(),
        "a message of no list has no link"
    );
    serve.stop(nix::sys::signal::Signal::SIGTERM, 30);
}
