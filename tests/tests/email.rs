//! `email.send` end to end against a real SMTP server (`tests/smtp/server.py`, aiosmtpd,
//! scripted per test), on SQLite and Postgres (the store keeps the per-recipient results),
//! with one Redis smoke test: a full message parsed back by Python's `email` package
//! (headers, both parts, the attachment, encoded non-ASCII subject and names, Bcc only in
//! the envelope, the `Message-ID` made from the job id); greylisting retried, with the same
//! `Message-ID`, and the recipient that had accepted not sent to again; a 5xx that makes the
//! job dead with the server's reply; a partial refusal, and an operator's retry that sends to
//! the refused recipient only; a connection dropped mid-DATA retried and stored once;
//! STARTTLS with a certificate of the test's own CA, AUTH, and a wrong password; implicit TLS
//! (SMTPS) to a self-signed certificate trusted through `ca_file`, and refused without it;
//! one-click unsubscribe links per recipient, signed with DKIM.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use conveyor_jobs::email::{
    self, AttachmentArg, EmailArgs, EmailConfig, Emails, MailboxArg, RecipientStatus, Security,
    Transport,
};
use conveyor_tests::eventually;
use conveyor_tests::smtp::SmtpServer;
use conveyor_worker::runtime::{QueueConfig, Worker, WorkerConfig};
use conveyor_worker::{Job, JobId, JobState, NewJob, Registry, RetryPolicy, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// One transport `main` to the server, in plain text (a local relay), retries after 50 ms.
fn config(server: &SmtpServer) -> EmailConfig {
    let mut t = Transport::new("127.0.0.1");
    t.port = Some(server.port);
    t.security = Security::None;
    t.timeout = Some(Duration::from_secs(5));
    let mut c = EmailConfig::default();
    c.transports.insert("main".into(), t);
    c.retry = RetryPolicy {
        base: Duration::from_millis(50),
        factor: 1.0,
        max: Duration::from_millis(50),
        jitter: 0.0,
    };
    c
}

struct Running {
    emails: Arc<Emails>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<conveyor_worker::Result<()>>,
}

impl Running {
    fn start(store: &Arc<dyn Store>, config: EmailConfig) -> Running {
        Self::start_with_env(store, config, &|_| None)
    }

    fn start_with_env(
        store: &Arc<dyn Store>,
        config: EmailConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Running {
        let emails = Arc::new(
            Emails::with_env(store.clone(), config, &conveyor_tests::test_keyring(), env).unwrap(),
        );
        let mut registry = Registry::new();
        email::register(&mut registry, emails.clone());
        let worker = Worker::new(
            store.clone(),
            registry,
            WorkerConfig {
                queues: vec![QueueConfig {
                    name: "default".into(),
                    concurrency: 4,
                }],
                poll_interval: Duration::from_millis(20),
                shutdown_grace: Duration::from_secs(5),
                ..WorkerConfig::default()
            },
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        Running {
            emails,
            shutdown,
            handle,
        }
    }

    /// Enqueues as a client would: the kind's enqueue check first, then the insert.
    async fn send(&self, store: &Arc<dyn Store>, message: &EmailArgs) -> JobId {
        let args = serde_json::to_value(message).unwrap();
        self.emails
            .validators()
            .check(email::KIND, &args)
            .unwrap_or_else(|e| panic!("{args} refused: {e}"));
        store
            .enqueue(NewJob::new(email::KIND, args).max_attempts(5))
            .await
            .unwrap()
            .id
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

async fn job_in(store: &Arc<dyn Store>, id: JobId, states: &[JobState]) -> Job {
    eventually(30, &format!("job {id} to reach {states:?}"), || {
        let store = store.clone();
        async move {
            let j = store.get(id).await.unwrap()?;
            states.contains(&j.state).then_some(j)
        }
    })
    .await
}

fn message(to: &[&str]) -> EmailArgs {
    EmailArgs {
        from: "Zoë Support <support@example.com>".into(),
        to: to.iter().map(|a| MailboxArg::from(*a)).collect(),
        subject: "Your receipt".into(),
        text: Some("Thanks for your order.".into()),
        ..EmailArgs::default()
    }
}

fn status_of(record: &email::DeliveryRecord, address: &str) -> RecipientStatus {
    record
        .recipients
        .iter()
        .find(|r| r.address == address)
        .unwrap_or_else(|| panic!("{address} in {record:?}"))
        .status
}

conveyor_tests::store_variant_tests!(
    sqlite,
    async { Some(conveyor_tests::TestStore::sqlite().await) },
    a_full_message_arrives_as_written,
    greylisting_is_retried_with_the_same_message_id_and_no_resend,
    a_5xx_makes_the_job_dead_with_the_reply,
    a_partial_refusal_and_an_operator_retry_send_to_each_recipient_once,
    a_connection_dropped_mid_data_is_retried_and_stored_once,
    starttls_with_auth_and_a_wrong_password,
    implicit_tls_with_a_self_signed_certificate,
    a_hard_bounce_suppresses_the_address_for_the_next_email
);
conveyor_tests::store_variant_tests!(
    postgres,
    conveyor_tests::TestStore::postgres(),
    a_full_message_arrives_as_written,
    greylisting_is_retried_with_the_same_message_id_and_no_resend,
    a_5xx_makes_the_job_dead_with_the_reply,
    a_partial_refusal_and_an_operator_retry_send_to_each_recipient_once,
    a_connection_dropped_mid_data_is_retried_and_stored_once,
    starttls_with_auth_and_a_wrong_password,
    a_hard_bounce_suppresses_the_address_for_the_next_email
);
conveyor_tests::store_variant_tests!(
    redis,
    conveyor_tests::TestStore::redis(),
    greylisting_is_retried_with_the_same_message_id_and_no_resend,
    a_hard_bounce_suppresses_the_address_for_the_next_email
);

async fn a_hard_bounce_suppresses_the_address_for_the_next_email(store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({
        "rcpt": {"gone@example.org": [[550, "5.1.1 No such user here"]]},
    })) else {
        return;
    };
    let run = Running::start(&store, config(&server));
    let id = run.send(&store, &message(&["gone@example.org"])).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Dead);
    let s = email::suppression::find(store.as_ref(), "Gone@Example.org", None)
        .await
        .unwrap()
        .expect("the hard bounce suppressed the address");
    assert_eq!(s.reason, email::suppression::Reason::HardBounce);
    assert!(s.detail.as_deref().unwrap_or("").contains("5.1.1"), "{s:?}");
    let rcpts_before = server
        .events()
        .iter()
        .filter(|e| e["event"] == "rcpt")
        .count();

    // The next email to it (and to another address) skips it: recorded, never sent.
    let id = run
        .send(&store, &message(&["gone@example.org", "ada@example.org"]))
        .await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(
        status_of(&record, "gone@example.org"),
        RecipientStatus::Suppressed
    );
    let reply = record.recipients[0].reply.clone().unwrap_or_default();
    assert!(reply.contains("hard_bounce"), "{reply}");
    assert_eq!(
        status_of(&record, "ada@example.org"),
        RecipientStatus::Accepted
    );
    assert_eq!(record.attempts[0].suppressed, 1);
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["ada@example.org"]);
    let tried_gone = server
        .events()
        .iter()
        .filter(|e| e["event"] == "rcpt" && e["address"] == "gone@example.org")
        .count();
    assert_eq!(
        tried_gone, rcpts_before,
        "the suppressed address was never offered again"
    );

    // A suppression for one list stops that list's messages only.
    email::suppression::add(
        store.as_ref(),
        email::suppression::NewSuppression {
            address: "ada@example.org".into(),
            list: Some("newsletter".into()),
            reason: email::suppression::Reason::Unsubscribe,
            detail: None,
        },
    )
    .await
    .unwrap();
    let mut news = message(&["ada@example.org"]);
    news.list = Some("newsletter".into());
    let id = run.send(&store, &news).await;
    job_in(&store, id, &[JobState::Completed]).await;
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(record.recipients[0].status, RecipientStatus::Suppressed);
    let id = run.send(&store, &message(&["ada@example.org"])).await;
    job_in(&store, id, &[JobState::Completed]).await;
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(record.recipients[0].status, RecipientStatus::Accepted);
    assert_eq!(server.received().len(), 2);
    run.stop().await;
}

async fn a_full_message_arrives_as_written(store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({})) else {
        return;
    };
    let run = Running::start(&store, config(&server));
    let pdf = b"%PDF-1.4 not really a pdf \x00\x01\x02".to_vec();
    let mut m = message(&["Åsa Öberg <asa@example.org>"]);
    m.cc = vec![MailboxArg::Parts {
        email: "cc@example.org".into(),
        name: Some("Jürgen Groß".into()),
    }];
    m.bcc = vec!["hidden@example.net".into()];
    m.reply_to = Some("help@example.com".into());
    m.subject = "Grüße — your receipt №42 ✓".into();
    m.text = None;
    m.html = Some("<h1>Hello Åsa</h1><p>Your order <b>#42</b> has shipped.</p>".into());
    m.attachments = vec![AttachmentArg {
        filename: "receipt-42.pdf".into(),
        content_type: Some("application/pdf".into()),
        content: B64.encode(&pdf),
    }];
    m.headers.insert("X-Campaign".into(), "receipts".into());
    let id = run.send(&store, &m).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);

    // One transaction per recipient, the same bytes each time.
    let got = server.received();
    assert_eq!(got.len(), 3, "{got:?}");
    let mut rcpts: Vec<&str> = got.iter().map(|r| r.rcpt_tos[0].as_str()).collect();
    rcpts.sort_unstable();
    assert_eq!(
        rcpts,
        ["asa@example.org", "cc@example.org", "hidden@example.net"]
    );
    assert!(
        got.iter()
            .all(|r| r.rcpt_tos.len() == 1 && r.raw == got[0].raw)
    );
    let r = &got[0];
    assert_eq!(r.mail_from, "support@example.com");
    assert!(r.raw.is_ascii(), "{}", r.raw);
    assert!(
        !r.raw.contains("Grüße") && r.raw.to_ascii_lowercase().contains("=?utf-8?"),
        "the subject is encoded: {}",
        r.raw
    );
    assert_eq!(r.parsed["subject"], "Grüße — your receipt №42 ✓");
    assert_eq!(r.parsed["from"][0]["name"], "Zoë Support");
    assert_eq!(r.parsed["to"][0]["name"], "Åsa Öberg");
    assert_eq!(r.parsed["to"][0]["address"], "asa@example.org");
    assert_eq!(r.parsed["cc"][0]["name"], "Jürgen Groß");
    assert_eq!(r.header("reply-to"), Some("help@example.com"));
    assert_eq!(r.header("x-campaign"), Some("receipts"));
    assert!(r.header("bcc").is_none() && !r.raw.contains("hidden@example.net"));
    assert_eq!(
        r.header("message-id"),
        Some(format!("<{id}@example.com>").as_str())
    );
    assert_eq!(r.parsed["content_type"], "multipart/mixed");
    let html = r.parts("text/html");
    assert_eq!(html.len(), 1);
    assert!(html[0]["text"].as_str().unwrap().contains("<b>#42</b>"));
    let text = r.parts("text/plain");
    assert_eq!(text.len(), 1, "the text part is derived from the HTML");
    let text = text[0]["text"].as_str().unwrap();
    assert!(
        text.contains("Hello Åsa") && text.contains("#42") && !text.contains("<b>"),
        "{text}"
    );
    let pdfs = r.parts("application/pdf");
    assert_eq!(pdfs.len(), 1);
    assert_eq!(pdfs[0]["filename"], "receipt-42.pdf");
    assert_eq!(pdfs[0]["disposition"], "attachment");
    assert_eq!(
        B64.decode(pdfs[0]["base64"].as_str().unwrap()).unwrap(),
        pdf
    );
    let alternative = r.parsed["parts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["content_type"] == "multipart/alternative");
    assert!(alternative, "{}", r.parsed);

    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(record.message_id, format!("<{id}@example.com>"));
    assert!(
        record
            .recipients
            .iter()
            .all(|r| r.status == RecipientStatus::Accepted && r.code == Some(250)),
        "{record:?}"
    );
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].result, "done");
    run.stop().await;
}

async fn greylisting_is_retried_with_the_same_message_id_and_no_resend(store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({
        "rcpt": {"late@example.org": [[450, "4.2.0 Greylisted, try again later"]]},
    })) else {
        return;
    };
    let run = Running::start(&store, config(&server));
    let id = run
        .send(&store, &message(&["early@example.org", "late@example.org"]))
        .await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    assert_eq!(job.attempt, 2, "one retry: {:?}", job.attempts);
    assert!(
        job.attempts[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("450") && e.contains("Greylisted")),
        "{:?}",
        job.attempts
    );
    let got = server.received();
    let to: Vec<&str> = got.iter().map(|r| r.rcpt_tos[0].as_str()).collect();
    assert_eq!(
        to,
        ["early@example.org", "late@example.org"],
        "the recipient that accepted is not sent to again"
    );
    assert_eq!(got[0].header("message-id"), got[1].header("message-id"));
    assert_eq!(
        got[0].header("message-id"),
        Some(format!("<{id}@example.com>").as_str())
    );
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    let results: Vec<&str> = record.attempts.iter().map(|a| a.result.as_str()).collect();
    assert_eq!(results, ["retry", "done"]);
    assert_eq!(record.attempts[1].tried, ["late@example.org"]);
    assert!(
        record
            .recipients
            .iter()
            .all(|r| r.status == RecipientStatus::Accepted)
    );
    run.stop().await;
}

async fn a_5xx_makes_the_job_dead_with_the_reply(store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({
        "data": [[554, "5.7.1 Message rejected as spam"]],
    })) else {
        return;
    };
    let run = Running::start(&store, config(&server));
    let id = run.send(&store, &message(&["ada@example.org"])).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(job.attempt, 1, "a 5xx is not retried");
    let error = job.attempts[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("554") && error.contains("Message rejected as spam"),
        "{error}"
    );
    assert!(server.received().is_empty());
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(
        status_of(&record, "ada@example.org"),
        RecipientStatus::Refused
    );
    assert_eq!(record.recipients[0].code, Some(554));
    run.stop().await;
}

async fn a_partial_refusal_and_an_operator_retry_send_to_each_recipient_once(
    store: Arc<dyn Store>,
) {
    let Some(server) = SmtpServer::start(json!({
        "rcpt": {"gone@example.org": [[550, "5.2.1 Mailbox disabled for now"]]},
    })) else {
        return;
    };
    let run = Running::start(&store, config(&server));
    let id = run
        .send(&store, &message(&["ada@example.org", "gone@example.org"]))
        .await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(job.attempt, 1);
    let error = job.attempts[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("accepted by 1 of 2")
            && error.contains("gone@example.org")
            && error.contains("Mailbox disabled"),
        "{error}"
    );
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(
        status_of(&record, "ada@example.org"),
        RecipientStatus::Accepted
    );
    assert_eq!(
        status_of(&record, "gone@example.org"),
        RecipientStatus::Refused
    );
    assert_eq!(server.received().len(), 1);

    // The operator retries the dead job (the mailbox was restored): only the refused
    // recipient is sent to.
    store.retry(id).await.unwrap();
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    let to: Vec<String> = server
        .received()
        .iter()
        .map(|r| r.rcpt_tos[0].clone())
        .collect();
    assert_eq!(to, ["ada@example.org", "gone@example.org"]);
    run.stop().await;
}

async fn a_connection_dropped_mid_data_is_retried_and_stored_once(store: Arc<dyn Store>) {
    let Some(server) = SmtpServer::start(json!({"data": ["drop"]})) else {
        return;
    };
    let run = Running::start(&store, config(&server));
    let id = run.send(&store, &message(&["ada@example.org"])).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    assert_eq!(job.attempt, 2);
    let datas = server
        .events()
        .iter()
        .filter(|e| e["event"] == "data")
        .count();
    assert_eq!(datas, 2, "the data was sent twice: {:?}", server.events());
    assert_eq!(
        server.received().len(),
        1,
        "the server never said 250 to the first: one message stored"
    );
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(record.attempts[0].result, "retry");
    assert!(record.attempts[0].error.is_some());
    run.stop().await;
}

async fn starttls_with_auth_and_a_wrong_password(store: Arc<dyn Store>) {
    let Some(certs) = conveyor_tests::tls::Certs::generate() else {
        return;
    };
    let tls = json!({
        "cert": certs.path("server.pem"),
        "key": certs.path("server.key"),
    });
    let Some(server) = SmtpServer::start(json!({
        "starttls": tls,
        "auth": {"user": "app", "password": "s3cret-pw"},
    })) else {
        return;
    };
    let mut c = config(&server);
    let mut good = Transport::new("localhost");
    good.port = Some(server.port);
    good.security = Security::Starttls;
    good.ca_file = Some(certs.path("ca.pem"));
    good.username = Some("app".into());
    good.password_env = Some("TEST_SMTP_PASSWORD".into());
    let mut bad = good.clone();
    bad.password_env = None;
    bad.password = Some("Wr0ng-Passw0rd".into());
    c.transports.insert("main".into(), good);
    c.transports.insert("bad".into(), bad);
    c.default_transport = Some("main".into());
    let run = Running::start_with_env(&store, c, &|var| {
        (var == "TEST_SMTP_PASSWORD").then(|| "s3cret-pw".to_string())
    });
    let id = run.send(&store, &message(&["ada@example.org"])).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls && got[0].authenticated, "{got:?}");

    let mut m = message(&["ada@example.org"]);
    m.transport = Some("bad".into());
    let id = run.send(&store, &m).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Dead, "{:?}", job.attempts);
    let error = job.attempts[0].error.clone().unwrap_or_default();
    assert!(error.contains("535"), "{error}");
    assert!(
        !error.contains("Wr0ng-Passw0rd"),
        "the password is never shown: {error}"
    );
    assert_eq!(server.received().len(), 1);
    run.stop().await;
}

/// Implicit TLS (SMTPS, port-465 style: TLS from the first byte) to a server whose
/// certificate is self-signed, trusted through the transport's `ca_file`; the same server
/// with a transport that does not trust it is never sent to, the TLS failure recorded.
async fn implicit_tls_with_a_self_signed_certificate(store: Arc<dyn Store>) {
    let Some(certs) = conveyor_tests::tls::Certs::generate() else {
        return;
    };
    let Some(server) = SmtpServer::start(json!({
        "implicit_tls": {"cert": certs.path("self-signed.pem"), "key": certs.path("server.key")},
    })) else {
        return;
    };
    let mut c = config(&server);
    let mut smtps = Transport::new("localhost");
    smtps.port = Some(server.port);
    smtps.security = Security::Tls;
    smtps.ca_file = Some(certs.path("self-signed.pem"));
    smtps.timeout = Some(Duration::from_secs(5));
    let mut untrusted = smtps.clone();
    untrusted.ca_file = Some(certs.path("other-ca.pem"));
    c.transports.insert("main".into(), smtps);
    c.transports.insert("untrusted".into(), untrusted);
    c.default_transport = Some("main".into());
    let run = Running::start(&store, c);
    let id = run.send(&store, &message(&["ada@example.org"])).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    let got = server.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls, "received over TLS: {got:?}");
    assert_eq!(got[0].header("Subject"), Some("Your receipt"));

    let mut m = message(&["bo@example.org"]);
    m.transport = Some("untrusted".into());
    let id = run.send(&store, &m).await;
    let job = job_in(&store, id, &[JobState::Retryable, JobState::Dead]).await;
    let error = job.attempts[0].error.clone().unwrap_or_default();
    assert!(
        error.to_lowercase().contains("certificate"),
        "the TLS failure is named: {error}"
    );
    let record = run.emails.record(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(
        status_of(&record, "bo@example.org"),
        RecipientStatus::Deferred
    );
    assert_eq!(server.received().len(), 1, "nothing sent without trust");
    run.stop().await;
}

/// `openssl` with `args`, its stdout.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (scripts/test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A new private key (PEM, as `openssl genpkey` writes it: PKCS#8) and the DKIM TXT record
/// of its public half.
fn dkim_key(dir: &std::path::Path, algorithm: &str) -> (String, String) {
    let path = dir.join(format!("{algorithm}.pem"));
    let path_s = path.to_str().unwrap();
    let mut gen_args = vec!["genpkey", "-algorithm", algorithm, "-out", path_s];
    if algorithm == "RSA" {
        gen_args.extend(["-pkeyopt", "rsa_keygen_bits:2048"]);
    }
    openssl(&gen_args);
    let der = openssl(&["pkey", "-in", path_s, "-pubout", "-outform", "DER"]);
    let record = if algorithm == "RSA" {
        format!("v=DKIM1; k=rsa; p={}", B64.encode(&der))
    } else {
        // RFC 8463: the bare 32-byte public key, after the SubjectPublicKeyInfo's header.
        format!(
            "v=DKIM1; k=ed25519; p={}",
            B64.encode(&der[der.len() - 32..])
        )
    };
    (std::fs::read_to_string(&path).unwrap(), record)
}

/// DKIM: an RSA key from a file for the `From` domain, and an Ed25519 key from the
/// environment named by a transport; each message arrives signed, and dkimpy verifies it
/// against the public key (and refuses it once a signed header is changed). A bad key
/// stops the service at start with the key named.
#[tokio::test]
async fn dkim_signatures_verify_with_an_independent_verifier() {
    if conveyor_tests::redis_server::find_on_path("openssl").is_none() {
        conveyor_tests::unavailable::<()>("openssl is not on PATH (scripts/test-deps.sh)");
        return;
    }
    let Some(server) =
        SmtpServer::start(json!({"rcpt": {"grey@example.org": [[451, "4.7.1 greylisted"]]}}))
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!(
        "conveyor-dkim-keys-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (rsa_pem, rsa_txt) = dkim_key(&dir, "RSA");
    let (ed_pem, ed_txt) = dkim_key(&dir, "ed25519");
    let records = json!({
        "s2026._domainkey.example.com": rsa_txt,
        "ed._domainkey.example.com": ed_txt,
    });

    let mut c = config(&server);
    c.dkim.insert(
        "example.com".into(),
        email::dkim::DkimKey {
            selector: "s2026".into(),
            domain: None,
            private_key: None,
            private_key_env: None,
            private_key_file: Some(dir.join("RSA.pem")),
        },
    );
    c.dkim.insert(
        "ed".into(),
        email::dkim::DkimKey {
            selector: "ed".into(),
            domain: Some("example.com".into()),
            private_key: None,
            private_key_env: Some("DKIM_ED25519".into()),
            private_key_file: None,
        },
    );
    let mut ed_transport = c.transports["main"].clone();
    ed_transport.dkim = Some("ed".into());
    c.transports.insert("ed".into(), ed_transport);
    c.default_transport = Some("main".into());

    // A bad key file, a missing one, and an unset variable: refused at start, key named.
    std::fs::write(
        dir.join("bad.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let test_store = conveyor_tests::TestStore::sqlite().await;
    let store_for_checks = test_store.store.clone();
    for (file, want) in [
        ("bad.pem", "`email.dkim.example.com.private_key_file`"),
        ("missing.pem", "cannot read"),
    ] {
        let mut bad = c.clone();
        bad.dkim.get_mut("example.com").unwrap().private_key_file = Some(dir.join(file));
        let err = Emails::with_env(
            store_for_checks.clone(),
            bad,
            &conveyor_tests::test_keyring(),
            &|_| Some(ed_pem.clone()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(want) && !err.contains("BEGIN"), "{err}");
    }
    let err = Emails::with_env(
        store_for_checks.clone(),
        c.clone(),
        &conveyor_tests::test_keyring(),
        &|_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("email.dkim.ed.private_key_env") && err.contains("DKIM_ED25519"),
        "{err}"
    );
    assert!(rsa_pem.contains("BEGIN PRIVATE KEY"));

    let store = store_for_checks;
    let ed_env = ed_pem.clone();
    let run = Running::start_with_env(&store, c, &move |var| {
        (var == "DKIM_ED25519").then(|| ed_env.clone())
    });
    // Through `main`: signed with the From domain's RSA key; one recipient greylisted first,
    // so its copy is signed on the retry.
    let rsa_id = run
        .send(&store, &message(&["asa@example.org", "grey@example.org"]))
        .await;
    let mut through_ed = message(&["bo@example.org"]);
    through_ed.transport = Some("ed".into());
    through_ed.subject = "Grüße from the ed25519 transport".into();
    let ed_id = run.send(&store, &through_ed).await;
    for id in [rsa_id, ed_id] {
        let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
        assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    }
    run.stop().await;

    let got = server.received();
    assert_eq!(got.len(), 3, "{got:?}");
    for r in &got {
        let Some(verdict) = conveyor_tests::smtp::dkim_verify(&records, &r.raw) else {
            return;
        };
        let want = if r.rcpt_tos[0] == "bo@example.org" {
            ("ed", "ed25519-sha256")
        } else {
            ("s2026", "rsa-sha256")
        };
        assert_eq!(verdict["ok"], true, "{verdict} for\n{}", r.raw);
        assert_eq!(verdict["domain"], "example.com", "{verdict}");
        assert_eq!(verdict["selector"], want.0, "{verdict}");
        assert_eq!(verdict["algorithm"], want.1, "{verdict}");
        // Changing a signed header breaks the signature.
        let tampered = r.raw.replacen("Subject: ", "Subject: Re: ", 1);
        assert_ne!(tampered, r.raw);
        let verdict = conveyor_tests::smtp::dkim_verify(&records, &tampered).unwrap();
        assert_eq!(verdict["ok"], false, "{verdict}");
    }
    // The retried copy carries the same Message-ID and body hash as the first one.
    let rsa_copies: Vec<&conveyor_tests::smtp::Received> = got
        .iter()
        .filter(|r| r.rcpt_tos[0] != "bo@example.org")
        .collect();
    let bh = |r: &conveyor_tests::smtp::Received| {
        let sig = r.header("DKIM-Signature").unwrap().to_string();
        sig.split(';')
            .find(|t| t.trim().starts_with("bh="))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(bh(rsa_copies[0]), bh(rsa_copies[1]));
    assert_eq!(
        rsa_copies[0].header("Message-ID"),
        rsa_copies[1].header("Message-ID")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// One-click unsubscribe (RFC 8058): with `email.public_url` set, each recipient of a
/// listed message gets a copy of its own whose `List-Unsubscribe` link carries a token for
/// its address and the list, and whose DKIM signature covers both unsubscribe headers
/// (dkimpy verifies it, and refuses it once the link is swapped for another recipient's).
/// A message of no list is sent as one message, without them.
#[tokio::test]
async fn listed_messages_carry_a_signed_one_click_link_per_recipient() {
    if conveyor_tests::redis_server::find_on_path("openssl").is_none() {
        conveyor_tests::unavailable::<()>("openssl is not on PATH (scripts/test-deps.sh)");
        return;
    }
    let Some(server) = SmtpServer::start(json!({})) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!(
        "conveyor-dkim-list-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (_, rsa_txt) = dkim_key(&dir, "RSA");
    let records = json!({ "s1._domainkey.example.com": rsa_txt });
    let mut c = config(&server);
    c.public_url = Some("https://links.example.test".into());
    c.dkim.insert(
        "example.com".into(),
        email::dkim::DkimKey {
            selector: "s1".into(),
            domain: None,
            private_key: None,
            private_key_env: None,
            private_key_file: Some(dir.join("RSA.pem")),
        },
    );
    let test_store = conveyor_tests::TestStore::sqlite().await;
    let store = test_store.store.clone();

    // No secrets key to sign links with, or a public_url that is not a base URL: refused at
    // start, naming the key.
    let err = Emails::new(
        store.clone(),
        c.clone(),
        &conveyor_worker::keyring::Keyring::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("email.public_url") && err.contains("secrets.keys"),
        "{err}"
    );
    let mut bad = c.clone();
    bad.public_url = Some("links.example.test".into());
    let err = Emails::new(store.clone(), bad, &conveyor_tests::test_keyring())
        .unwrap_err()
        .to_string();
    assert!(err.contains("email.public_url"), "{err}");

    let run = Running::start(&store, c);
    let mut listed = message(&["ada@example.org"]);
    listed.bcc = vec!["bo@example.org".into()];
    listed.list = Some("newsletter".into());
    let id = run.send(&store, &listed).await;
    let job = job_in(&store, id, &[JobState::Completed, JobState::Dead]).await;
    assert_eq!(job.state, JobState::Completed, "{:?}", job.attempts);
    let id = run.send(&store, &message(&["cy@example.org"])).await;
    job_in(&store, id, &[JobState::Completed]).await;
    run.stop().await;

    let got = server.received();
    assert_eq!(got.len(), 3, "{got:?}");
    let signed_headers = |r: &conveyor_tests::smtp::Received| {
        let sig: String = r
            .header("DKIM-Signature")
            .unwrap()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        sig.split(';')
            .find_map(|t| t.strip_prefix("h="))
            .unwrap()
            .to_string()
    };
    let mut links = Vec::new();
    for r in &got[..2] {
        let to = r.rcpt_tos[0].as_str();
        assert_eq!(
            r.header("List-Unsubscribe-Post"),
            Some("List-Unsubscribe=One-Click")
        );
        let link = r.header("List-Unsubscribe").unwrap().to_string();
        let token = link
            .strip_prefix("<https://links.example.test/v1/unsubscribe/")
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or_else(|| panic!("{link}"));
        let asked = email::unsubscribe::read_token(&conveyor_tests::test_keyring(), token).unwrap();
        assert_eq!(
            (asked.address.as_str(), asked.list.as_str()),
            (to, "newsletter")
        );
        let h = signed_headers(r);
        assert!(
            h.contains("list-unsubscribe:list-unsubscribe-post"),
            "RFC 8058 §3.1: both headers signed: h={h}"
        );
        let Some(verdict) = conveyor_tests::smtp::dkim_verify(&records, &r.raw) else {
            return;
        };
        assert_eq!(verdict["ok"], true, "{verdict} for\n{}", r.raw);
        links.push(link);
    }
    assert_ne!(links[0], links[1], "each recipient has its own link");
    // Ada's copy with Bo's link: the signature no longer verifies.
    let swapped = got[0].raw.replacen(&links[0], &links[1], 1);
    assert_ne!(swapped, got[0].raw);
    let verdict = conveyor_tests::smtp::dkim_verify(&records, &swapped).unwrap();
    assert_eq!(verdict["ok"], false, "{verdict}");
    // A message of no list: no link, and signed as before.
    let plain = &got[2];
    assert!(plain.header("List-Unsubscribe").is_none(), "{}", plain.raw);
    assert!(!signed_headers(plain).contains("list-unsubscribe"));
    assert_eq!(
        conveyor_tests::smtp::dkim_verify(&records, &plain.raw).unwrap()["ok"],
        true
    );
    let _ = std::fs::remove_dir_all(&dir);
}
