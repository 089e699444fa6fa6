//! A real API server on `127.0.0.1:0` over a per-test store, and a request helper.

#![allow(dead_code)]

use std::sync::Arc;

use conveyor_api::audit::Actor;
use conveyor_api::key::{self, Scope};
use conveyor_api::{ApiConfig, AppState};
use conveyor_worker::Store;
use reqwest::{Method, RequestBuilder};
use tokio_util::sync::CancellationToken;

/// A running server; stops when dropped.
pub struct Server {
    pub base: String,
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    /// Serves the API over `store` with `config`.
    pub async fn start(store: Arc<dyn Store>, config: ApiConfig) -> Server {
        Self::start_with(store, config, None).await
    }

    /// [`Server::start`] with the backup settings behind `/v1/backups`.
    pub async fn start_with(
        store: Arc<dyn Store>,
        config: ApiConfig,
        backups: Option<Arc<conveyor_backup::Backups>>,
    ) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let webhooks = conveyor_jobs::webhook::Webhooks::new(
            store.clone(),
            conveyor_jobs::webhook::WebhookConfig::default(),
        )
        .unwrap()
        .with_keyring(conveyor_tests::test_keyring());
        let mut state = AppState::new(store.clone(), config).with_webhooks(Arc::new(webhooks));
        if let Some(backups) = backups {
            state = state.with_backups(backups);
        }
        let app = conveyor_api::router(state);
        let s = stop.clone();
        tokio::spawn(async move {
            conveyor_api::serve(listener, app, async move { s.cancelled().await })
                .await
                .unwrap();
        });
        Server {
            base: format!("http://{addr}"),
            store,
            http: reqwest::Client::new(),
            stop,
        }
    }

    /// With the default config.
    pub async fn default(store: Arc<dyn Store>) -> Server {
        Self::start(store, ApiConfig::default()).await
    }

    /// A fresh key with `scope`.
    pub async fn key(&self, scope: Scope) -> String {
        key::create(&self.store, &format!("test-{scope}"), scope, Actor::cli())
            .await
            .unwrap()
            .1
    }

    /// A request to `path` with an optional key.
    pub fn req(&self, method: Method, path: &str, key: Option<&str>) -> RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }
}

/// The response's status and JSON body (`Null` if not JSON).
pub async fn send(r: RequestBuilder) -> (u16, serde_json::Value) {
    let response = r.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Generates one test per backend for each `async fn(Arc<dyn Store>)`.
#[macro_export]
macro_rules! api_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let t = conveyor_tests::TestStore::sqlite().await;
                    super::$name(t.store.clone()).await;
                    t.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = conveyor_tests::TestStore::postgres().await else { return };
                    super::$name(t.store.clone()).await;
                    t.cleanup().await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(t) = conveyor_tests::TestStore::redis().await else { return };
                    super::$name(t.store.clone()).await;
                    t.cleanup().await;
                }
            )*
        }
    };
}
