//! `/v1/webhooks` and `/v1/events` over a real server: create an endpoint, send an event
//! twice with one idempotency key (one set of deliveries), read it back with its attempt log,
//! rotate the secret, replay, and the audit trail of the changes.

mod common;

use std::sync::Arc;

use common::{Server, send};
use conveyor_api::key::Scope;
use conveyor_worker::Store;
use reqwest::Method;
use serde_json::json;

async fn endpoints_and_events(store: Arc<dyn Store>) {
    let s = Server::default(store.clone()).await;
    let operate = s.key(Scope::Operate).await;
    let admin = s.key(Scope::Admin).await;
    let enqueue = s.key(Scope::Enqueue).await;

    let (status, ep) = send(
        s.req(Method::POST, "/v1/webhooks/endpoints", Some(&operate))
            .json(&json!({"url": "https://example.com/hooks", "event_types": ["invoice.*"], "rate_limit": 5.0})),
    )
    .await;
    assert_eq!(status, 201, "{ep}");
    let id = ep["id"].as_str().unwrap().to_string();
    let secret = ep["secrets"][0]["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_") && secret.len() > 20);

    // Reads redact the secret; the admin-only route shows it.
    let (status, shown) = send(s.req(
        Method::GET,
        &format!("/v1/webhooks/endpoints/{id}"),
        Some(&operate),
    ))
    .await;
    assert_eq!(status, 200);
    assert_ne!(shown["secrets"][0]["secret"], secret.as_str());
    let (status, secrets) = send(s.req(
        Method::GET,
        &format!("/v1/webhooks/endpoints/{id}/secret"),
        Some(&admin),
    ))
    .await;
    assert_eq!(
        (status, secrets[0]["secret"].as_str()),
        (200, Some(secret.as_str()))
    );

    let (status, bad) = send(
        s.req(Method::POST, "/v1/webhooks/endpoints", Some(&operate))
            .json(&json!({"url": "ftp://example.com"})),
    )
    .await;
    assert_eq!(
        (status, bad["errors"][0]["field"].as_str()),
        (422, Some("url")),
        "{bad}"
    );

    let body = json!({"type": "invoice.paid", "payload": {"n": 1}});
    let (status, first) = send(
        s.req(Method::POST, "/v1/events", Some(&enqueue))
            .header("idempotency-key", "inv-1")
            .json(&body),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["event"]["deliveries"].as_array().unwrap().len(), 1);
    let (status, again) = send(
        s.req(Method::POST, "/v1/events", Some(&enqueue))
            .header("idempotency-key", "inv-1")
            .json(&body),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["event"]["id"], first["event"]["id"]);

    // The key follows the rule of every idempotency key (and of the documented pattern),
    // wherever it comes from, and a body key and header that differ are refused, as for jobs.
    for (header, body_key, field) in [
        (Some("inv\t1"), None, "Idempotency-Key"),
        (None, Some(" inv-1"), "idempotency_key"),
        (None, Some("inv-1 "), "idempotency_key"),
        (Some("inv-1"), Some("inv-2"), "idempotency_key"),
    ] {
        let mut body = body.clone();
        if let Some(key) = body_key {
            body["idempotency_key"] = json!(key);
        }
        let mut req = s
            .req(Method::POST, "/v1/events", Some(&enqueue))
            .json(&body);
        if let Some(key) = header {
            req = req.header("idempotency-key", key);
        }
        let (status, bad) = send(req).await;
        assert_eq!(
            (status, bad["errors"][0]["field"].as_str()),
            (422, Some(field)),
            "{header:?} {body_key:?}: {bad}"
        );
    }
    let evt = first["event"]["id"].as_str().unwrap();
    let (status, shown) =
        send(s.req(Method::GET, &format!("/v1/events/{evt}"), Some(&operate))).await;
    assert_eq!(
        (status, &shown["event_type"]),
        (200, &json!("invoice.paid"))
    );
    let (status, log) = send(s.req(
        Method::GET,
        &format!("/v1/events/{evt}/attempts"),
        Some(&operate),
    ))
    .await;
    assert_eq!(
        (status, log.as_array().map(Vec::len)),
        (200, Some(0)),
        "nothing ran yet"
    );

    let (status, rotated) = send(
        s.req(
            Method::POST,
            &format!("/v1/webhooks/endpoints/{id}/rotate-secret"),
            Some(&admin),
        )
        .json(&json!({"overlap": "1h"})),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["secrets"].as_array().unwrap().len(), 2);

    let (status, health) = send(s.req(
        Method::GET,
        &format!("/v1/webhooks/endpoints/{id}/health"),
        Some(&operate),
    ))
    .await;
    assert_eq!((status, &health["circuit"]), (200, &json!("closed")));

    let (status, _) = send(s.req(
        Method::DELETE,
        &format!("/v1/webhooks/endpoints/{id}"),
        Some(&operate),
    ))
    .await;
    assert_eq!(status, 204);
    let (status, p) = send(s.req(
        Method::GET,
        &format!("/v1/webhooks/endpoints/{id}"),
        Some(&operate),
    ))
    .await;
    assert_eq!((status, p["status"].as_u64()), (404, Some(404)));

    let entries = conveyor_api::audit::list(&store, None, 100).await.unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    for a in [
        "webhook.endpoint.create",
        "webhook.endpoint.rotate_secret",
        "webhook.endpoint.delete",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
}

api_tests!(endpoints_and_events);

/// Custom header values (a receiver's `Authorization`) are shown to `admin` keys only.
#[tokio::test]
async fn endpoint_header_values_are_for_admin_only() {
    let t = conveyor_tests::TestStore::sqlite().await;
    let s = Server::default(t.store.clone()).await;
    let admin = s.key(Scope::Admin).await;
    let operate = s.key(Scope::Operate).await;
    let read = s.key(Scope::Read).await;
    let (status, ep) = send(
        s.req(Method::POST, "/v1/webhooks/endpoints", Some(&admin))
            .json(&json!({
                "url": "https://example.com/hooks",
                "headers": {"Authorization": "Bearer receiver-token", "x-tenant": "acme"}
            })),
    )
    .await;
    assert_eq!(status, 201, "{ep}");
    let id = ep["id"].as_str().unwrap().to_string();
    let one = format!("/v1/webhooks/endpoints/{id}");
    for key in [&read, &operate] {
        let (status, shown) = send(s.req(Method::GET, &one, Some(key))).await;
        assert_eq!(status, 200);
        assert_eq!(shown["headers"]["Authorization"], "***", "{shown}");
        assert_eq!(shown["headers"]["x-tenant"], "***", "{shown}");
        let (_, all) = send(s.req(Method::GET, "/v1/webhooks/endpoints", Some(key))).await;
        assert!(!all.to_string().contains("receiver-token"), "{all}");
    }
    let (_, disabled) = send(s.req(Method::POST, &format!("{one}/disable"), Some(&operate))).await;
    assert!(
        !disabled.to_string().contains("receiver-token"),
        "{disabled}"
    );
    let (_, shown) = send(s.req(Method::GET, &one, Some(&admin))).await;
    assert_eq!(shown["headers"]["Authorization"], "Bearer receiver-token");
    let (_, all) = send(s.req(Method::GET, "/v1/webhooks/endpoints", Some(&admin))).await;
    assert_eq!(all[0]["headers"]["x-tenant"], "acme", "{all}");
    t.cleanup().await;
}

/// The record webhooks write when they disable an endpoint reads back as an audit entry.
#[test]
fn auto_disable_records_are_audit_entries() {
    let now = chrono::Utc::now();
    let ep = conveyor_jobs::webhook::Endpoint {
        id: "ep_x".into(),
        url: "https://example.com".into(),
        description: String::new(),
        enabled: false,
        event_types: Vec::new(),
        headers: Default::default(),
        secrets: Vec::new(),
        rate_limit: None,
        timeout_ms: None,
        retry_schedule_ms: None,
        follow_redirects: None,
        created_at: now,
        updated_at: now,
        disabled_reason: None,
    };
    let value = conveyor_jobs::webhook::delivery::auto_disable_audit(
        "0190a8c0-0000-7000-8000-000000000000",
        &ep,
        now,
        "failing",
        now,
    );
    let entry: conveyor_api::audit::AuditEntry = serde_json::from_value(value).unwrap();
    assert_eq!(entry.actor.name, "system");
    assert_eq!(entry.action, "webhook.endpoint.auto_disabled");
    assert_eq!(entry.target["webhook_endpoint"], "ep_x");
}
