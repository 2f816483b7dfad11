//! What tests in several binaries share: a host with a mail outbox (the
//! testkit's recording mailer), a small request builder, and the provider
//! API as one provider's key sees it.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::Arc;

use cxmpute_core::testkit::{chat_price, Behavior, StandInNode, TestHost};
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

/// Prices every chat call at 1,000 micro-credits whatever its tokens, so
/// that credits count calls.
pub async fn price_per_call(h: &TestHost) {
    let price = PriceEntry {
        per_million_input_tokens: Credits::ZERO,
        per_million_output_tokens: Credits::ZERO,
        ..chat_price()
    };
    h.broker.admin().put_price(price).await.unwrap();
}

/// The statuses of `n` chat calls with `key` sent at once, by status.
pub async fn calls_at_once(
    h: &TestHost,
    key: &Secret,
    n: usize,
) -> std::collections::BTreeMap<u16, usize> {
    let all = futures::future::join_all((0..n).map(|_| chat_status(h, key))).await;
    let mut by_status = std::collections::BTreeMap::new();
    for s in all {
        *by_status.entry(s).or_default() += 1;
    }
    by_status
}

/// On `h` (with a chat node), 200 calls at once against credits for 50:
/// exactly 50 are served, and the account ends at zero.
pub async fn fifty_of_200_calls_are_served(h: &TestHost) {
    price_per_call(h).await;
    let (user, key) = h.user(Credits(50_000)).await;
    let by_status = calls_at_once(h, &key, 200).await;
    assert_eq!(by_status, [(200, 50), (402, 150)].into_iter().collect());
    assert_eq!(h.balance(&user.id).await, Credits::ZERO);
    let usage = h
        .broker
        .store()
        .usage_records(&user.id, 1_000)
        .await
        .unwrap();
    assert_eq!(usage.len(), 50);
    h.assert_ledger().await;
}

/// On `h` (with a chat node), calls at once on one key never spend more
/// than its limit, however much its account holds.
pub async fn a_key_limit_holds_under_calls_at_once(h: &TestHost) {
    price_per_call(h).await;
    let (user, _) = h.user(Credits::whole(10)).await;
    let (_, key) = h
        .broker
        .admin()
        .create_api_key(&user.id, "limited", Some(Credits(20_000)), Vec::new())
        .await
        .unwrap();
    let by_status = calls_at_once(h, &key, 100).await;
    assert_eq!(by_status, [(200, 20), (429, 80)].into_iter().collect());
    let k = h.broker.store().api_key_by_hash(&key.hash()).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::ZERO));
    assert_eq!(h.balance(&user.id).await, Credits(10_000_000 - 20_000));
    h.assert_ledger().await;
}

/// On `h` (with the chat node `node`), what this host does to an account's
/// money or keys reaches the very next call, with a call in flight: a grant
/// is spendable at once and a removal gone at once (and cannot take what
/// the call in flight holds); a lowered key limit, a suspension and a
/// revocation are refused at once; the call in flight is settled as usual.
pub async fn money_changes_apply_at_once(h: &TestHost, node: &StandInNode) {
    price_per_call(h).await;
    let (user, key) = h.user(Credits(1_000)).await;
    assert_eq!(chat_status(h, &key).await, 200);
    assert_eq!(chat_status(h, &key).await, 402, "spent");
    let admin = h.broker.admin();
    let grant = |c: i64| admin.grant_credits(&user.id, Credits(c), "admin", "test");
    grant(2_000).await.unwrap();
    assert_eq!(chat_status(h, &key).await, 200, "granted");
    grant(-1_000).await.unwrap();
    assert_eq!(chat_status(h, &key).await, 402, "removed");
    grant(5_000).await.unwrap();

    // A call in flight on a limited key holds 1,000 of the balance and of
    // the key's limit, until its stream ends at its output limit.
    let (limited_key, limited) = h
        .broker
        .admin()
        .create_api_key(&user.id, "limited", Some(Credits(5_000)), Vec::new())
        .await
        .unwrap();
    node.set(Behavior::Drip(std::time::Duration::from_millis(50)));
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "stream": true, "max_tokens": 40});
    let in_flight = h.post("/v1/chat/completions", &limited, &body).await;
    assert_eq!(in_flight.status(), 200);
    node.set(Behavior::Ok);
    let settled = || async { h.broker.store().ledger_totals().await.unwrap().settlements };
    let before = settled().await;

    let removal = grant(-4_001).await;
    assert!(
        matches!(removal, Err(Error::InsufficientCredits(_))),
        "{removal:?}"
    );
    let a = h.broker.accounts();
    let lower = UpdateKeyRequest {
        credit_limit: Some(Some(Credits(1_500))),
        ..UpdateKeyRequest::default()
    };
    a.update_key(&user, &limited_key.id, lower).await.unwrap();
    assert_eq!(
        chat_status(h, &limited).await,
        429,
        "lowered under what is held"
    );
    assert_eq!(
        chat_status(h, &key).await,
        200,
        "the account still has 4,000"
    );
    let admin = h
        .broker
        .store()
        .user_by_email("admin@cxmpute.test")
        .await
        .unwrap();
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
    a.revoke_key(&user, &limited_key.id).await.unwrap();
    assert_eq!(chat_status(h, &limited).await, 401, "revoked");
    assert_eq!(
        settled().await,
        before + 2,
        "the stream was in flight throughout"
    );

    // The stream ends (at its output limit) once it is settled, charged
    // nothing here (a broken stream pays no per-call fee): what it held is
    // spendable again, 3,000 in all.
    let text = in_flight.text().await.unwrap();
    assert!(text.contains("stream_interrupted"), "{text}");
    assert_eq!(settled().await, before + 3);
    let by_status = calls_at_once(h, &key, 5).await;
    assert_eq!(by_status, [(200, 3), (402, 2)].into_iter().collect());
    h.assert_ledger().await;
}
