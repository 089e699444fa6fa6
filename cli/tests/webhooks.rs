//! `conveyor webhooks …` as a user runs it: create an endpoint, send an event twice with one
//! idempotency key, let `conveyor worker` deliver it to a real receiver, read the attempt log
//! and health, replay the event, and rotate the secret.

mod common;

use std::sync::Arc;

use common::{Process, conveyor, run, run_json};
use conveyor_tests::eventually;
use conveyor_tests::receiver::Receiver;
use conveyor_worker::Store;
use nix::sys::signal::Signal;

cli_backend_tests!(endpoint_event_delivery_and_replay);

async fn endpoint_event_delivery_and_replay(url: String, _store: Arc<dyn Store>) {
    let rx = Receiver::start().await;
    let ep = run_json(
        &url,
        &[
            "webhooks",
            "endpoints",
            "create",
            "--url",
            &rx.url("/hooks"),
            "--event-type",
            "invoice.*",
            "--header",
            "x-tenant=acme",
            "--retry-schedule",
            "0s,1s",
        ],
    );
    let id = ep["id"].as_str().unwrap().to_string();
    let secret = ep["secrets"][0]["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));

    let listed = run_json(&url, &["webhooks", "endpoints", "list"]);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_ne!(
        listed[0]["secrets"][0]["secret"],
        secret.as_str(),
        "lists redact secrets"
    );

    let send = [
        "webhooks",
        "send",
        "--type",
        "invoice.paid",
        "--payload",
        r#"{"invoice":"in_1"}"#,
        "--idempotency-key",
        "in_1-paid",
    ];
    let first = run_json(&url, &send);
    let again = run_json(&url, &send);
    assert_eq!(first["duplicate"], false);
    assert_eq!(again["duplicate"], true);
    assert_eq!(first["event"]["id"], again["event"]["id"]);
    let evt = first["event"]["id"].as_str().unwrap().to_string();

    let mut worker = conveyor(&url, &["worker"]);
    worker.env("CONVEYOR_WEBHOOKS__ALLOW_CIDRS", r#"["127.0.0.0/8"]"#);
    let mut worker = Process::spawn(worker);
    let got = eventually(30, "the delivery", || async {
        let got = rx.received("/hooks");
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got[0].header("webhook-id"), Some(evt.as_str()));
    assert_eq!(got[0].header("x-tenant"), Some("acme"));

    let log = eventually(10, "the attempt log", || async {
        let log = run_json(&url, &["webhooks", "attempts", "--endpoint", &id]);
        (!log["attempts"].as_array().unwrap().is_empty()).then_some(log)
    })
    .await;
    assert_eq!(log["attempts"][0]["status"], 200);
    assert_eq!(log["attempts"][0]["result"], "delivered");
    let (code, table, err) = run(&url, &["webhooks", "attempts", "--event", &evt]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("delivered"), "{table}");

    let replayed = run_json(&url, &["webhooks", "replay", "--event", &evt]);
    assert_eq!(replayed["queued"], 1);
    eventually(30, "the replay", || async {
        (rx.received("/hooks").len() >= 2).then_some(())
    })
    .await;

    let health = eventually(20, "health counters", || async {
        let h = run_json(&url, &["webhooks", "health", &id]);
        (h["last_hour"]["attempts"].as_u64() >= Some(1)).then_some(h)
    })
    .await;
    assert_eq!(health["circuit"], "closed");
    assert_eq!(health["last_hour"]["success_rate"], 1.0);

    let rotated = run_json(
        &url,
        &[
            "webhooks",
            "endpoints",
            "rotate-secret",
            &id,
            "--overlap",
            "1h",
        ],
    );
    assert_eq!(rotated["secrets"].as_array().unwrap().len(), 2);
    let (code, _, err) = run(&url, &["webhooks", "endpoints", "disable", &id]);
    assert_eq!(code, 0, "{err}");
    let shown = run_json(&url, &["webhooks", "endpoints", "show", &id]);
    assert_eq!(shown["enabled"], false);

    let (code, _, err) = run(&url, &["webhooks", "endpoints", "show", "ep_nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
    worker.stop(Signal::SIGTERM, 20);
}
