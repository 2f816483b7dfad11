//! What tests in several binaries share: a host with a mail outbox (the
//! testkit's recording mailer), a small request builder, and the provider
//! API as one provider's key sees it.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::Arc;

use cxmpute_core::testkit::TestHost;
#[allow(unused_imports)] // each test binary uses a different part of this module
pub use cxmpute_core::testkit::{expect_error, RecordingMailer, EMBED, MODEL};
use cxmpute_core::wire::*;
use cxmpute_core::*;
use serde_json::{json, Value};

pub const BOSS: &str = "boss@admins.test";

pub fn auth() -> AuthConfig {
    AuthConfig::default().with_admin_emails([BOSS.to_owned()])
}

pub async fn host_with(mailer: Arc<dyn Mailer>) -> TestHost {
    host_on(Arc::new(MemoryStore::new()), mailer).await
}

pub async fn host_on(store: Arc<dyn Store>, mailer: Arc<dyn Mailer>) -> TestHost {
    TestHost::start_market_with(store, Credits(500), move |b| b.mailer(mailer).auth(auth())).await
}

pub async fn host() -> (TestHost, RecordingMailer) {
    let outbox = RecordingMailer::default();
    (host_with(Arc::new(outbox.clone())).await, outbox)
}

/// A request to the host, with a bearer and cookies as given.
pub struct Call<'a> {
    h: &'a TestHost,
    method: &'static str,
    path: String,
    bearer: Option<String>,
    cookie: Option<String>,
    body: Option<Value>,
}

pub fn call<'a>(h: &'a TestHost, method: &'static str, path: impl Into<String>) -> Call<'a> {
    Call {
        h,
        method,
        path: path.into(),
        bearer: None,
        cookie: None,
        body: None,
    }
}

impl Call<'_> {
    pub fn bearer(mut self, b: impl AsRef<str>) -> Self {
        self.bearer = Some(b.as_ref().to_owned());
        self
    }
    pub fn cookie(mut self, c: impl Into<String>) -> Self {
        self.cookie = Some(c.into());
        self
    }
    pub fn json(mut self, v: Value) -> Self {
        self.body = Some(v);
        self
    }
    pub async fn send(self) -> reqwest::Response {
        let m = reqwest::Method::from_bytes(self.method.as_bytes()).unwrap();
        let mut r = reqwest::Client::new().request(m, format!("{}{}", self.h.url, self.path));
        if let Some(b) = self.bearer {
            r = r.bearer_auth(b);
        }
        if let Some(c) = self.cookie {
            r = r.header("cookie", c);
        }
        if let Some(b) = self.body {
            r = r.json(&b);
        }
        r.send().await.unwrap()
    }
    pub async fn status(self) -> u16 {
        self.send().await.status().as_u16()
    }
    pub async fn ok<T: serde::de::DeserializeOwned>(self) -> T {
        let what = format!("{} {}", self.method, self.path);
        let r = self.send().await;
        let s = r.status();
        let text = r.text().await.unwrap();
        assert!(s.is_success(), "{what}: {s} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
    }
}

pub async fn request_code(h: &TestHost, email: &str) -> reqwest::Response {
    call(h, "POST", "/v1/auth/code")
        .json(json!({ "email": email }))
        .send()
        .await
}

pub async fn verify(h: &TestHost, email: &str, code: &str) -> reqwest::Response {
    call(h, "POST", "/v1/auth/verify")
        .json(json!({ "email": email, "code": code }))
        .send()
        .await
}

pub async fn sign_in(h: &TestHost, outbox: &RecordingMailer, email: &str) -> SessionResponse {
    assert_eq!(request_code(h, email).await.status(), 202);
    let r = verify(h, email, &outbox.last_code(email)).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

pub fn chat() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

pub async fn grant(h: &TestHost, user: &UserId, credits: i64) {
    let r = call(h, "POST", format!("/v1/admin/users/{user}/credits"))
        .bearer(h.admin_key.expose())
        .json(json!({"amount": Credits::whole(credits), "reason": "top-up"}))
        .send()
        .await;
    assert_eq!(r.status(), 200);
}

/// The provider API, as one provider's key sees it.
pub struct ProviderApi {
    c: reqwest::Client,
    /// The provisions collection's URL.
    pub base: String,
    key: Secret,
}

impl ProviderApi {
    pub fn new(h: &TestHost, key: &Secret) -> Self {
        ProviderApi {
            c: reqwest::Client::new(),
            base: format!("{}/v1/provider/provisions", h.url),
            key: key.clone(),
        }
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> reqwest::Response {
        let mut r = self
            .c
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.key.expose());
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.c
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.key.expose())
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.c
            .delete(format!("{}{path}", self.base))
            .bearer_auth(self.key.expose())
            .send()
            .await
            .unwrap()
    }
}

/// The provider's nodes, as it lists them.
pub async fn listed(a: &ProviderApi) -> usize {
    let v: Value = a.get("").await.json().await.unwrap();
    v.as_array().unwrap().len()
}

/// The status of a chat call with `key`, its answer read.
pub async fn chat_status(h: &TestHost, key: &Secret) -> u16 {
    let r = h.post("/v1/chat/completions", key, &chat()).await;
    let status = r.status().as_u16();
    r.bytes().await.unwrap();
    status
}

/// On `h` (with a chat node), what this host does to a key held in memory
/// reaches its very next gateway call, the clock unmoved: narrowing its
/// routes, suspending its account, lifting both, revoking it.
pub async fn key_changes_apply_at_once(h: &TestHost) {
    let (user, key) = h.user(Credits::whole(10)).await;
    assert_eq!(chat_status(h, &key).await, 200);
    assert_eq!(chat_status(h, &key).await, 200);
    let store = h.broker.store();
    let id = store.api_key_by_hash(&key.hash()).await.unwrap().id;
    let admin = store.user_by_email("admin@cxmpute.test").await.unwrap();
    let a = h.broker.accounts();
    let routes = |r: Vec<Route>| UpdateKeyRequest {
        permitted_routes: Some(r),
        ..UpdateKeyRequest::default()
    };
    a.update_key(&user, &id, routes(vec![Route::Embeddings]))
        .await
        .unwrap();
    assert_eq!(chat_status(h, &key).await, 403, "narrowed routes");
    a.update_key(&user, &id, routes(Vec::new())).await.unwrap();
    assert_eq!(chat_status(h, &key).await, 200, "every route again");
    h.broker
        .admin()
        .suspend_user(&admin, &user.id, "test")
        .await
        .unwrap();
    assert_eq!(chat_status(h, &key).await, 403, "suspended");
    h.broker
        .admin()
        .unsuspend_user(&admin, &user.id)
        .await
        .unwrap();
    assert_eq!(chat_status(h, &key).await, 200, "unsuspended");
    a.revoke_key(&user, &id).await.unwrap();
    assert_eq!(chat_status(h, &key).await, 401, "revoked");
    h.assert_ledger().await;
}
