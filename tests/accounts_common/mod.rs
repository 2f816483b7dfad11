//! What the account tests share: a host with a mail outbox, and a small
//! request builder.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cxmpute_core::testkit::TestHost;
use cxmpute_core::wire::*;
use cxmpute_core::*;
use serde_json::{json, Value};

pub const MODEL: &str = "llama3.2:3b";
pub const EMBED: &str = "nomic-embed-text";
pub const BOSS: &str = "boss@admins.test";

/// Keeps mail instead of delivering it: the stand-in for the mail system in
/// tests that are not about delivery (the SMTP test uses a real server).
#[derive(Clone, Default)]
pub struct Outbox(Arc<Mutex<Vec<(String, String)>>>);

impl Outbox {
    pub fn last_code(&self, email: &str) -> String {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(to, _)| to == email)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("no mail to {email}"))
    }
}

#[async_trait]
impl Mailer for Outbox {
    async fn send_login_code(&self, email: &str, code: &Secret) -> Result<()> {
        self.0
            .lock()
            .unwrap()
            .push((email.to_owned(), code.expose().to_owned()));
        Ok(())
    }
}

pub fn auth() -> AuthConfig {
    AuthConfig::default().with_admin_emails([BOSS.to_owned()])
}

pub async fn host_with(mailer: Arc<dyn Mailer>) -> TestHost {
    host_on(Arc::new(MemoryStore::new()), mailer).await
}

pub async fn host_on(store: Arc<dyn Store>, mailer: Arc<dyn Mailer>) -> TestHost {
    let h = TestHost::start_with(store, move |b| {
        b.mailer(mailer)
            .auth(auth())
            .reward_policy(Arc::new(FlatReward(Credits(500))))
    })
    .await;
    h.broker
        .put_price(PriceEntry {
            service: Service::Chat,
            model: None,
            per_request: Credits(1_000),
            per_million_input_tokens: Credits(1_000_000),
            per_million_output_tokens: Credits(2_000_000),
            per_million_units: Credits::ZERO,
        })
        .await
        .unwrap();
    h
}

pub async fn host() -> (TestHost, Outbox) {
    let outbox = Outbox::default();
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

/// Asserts an OpenAI error answer with this status and code.
pub async fn expect_error(r: reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status().as_u16(), status);
    let e: ErrorBody = r.json().await.unwrap();
    assert_eq!(e.error.code.as_deref(), Some(code), "{}", e.error.message);
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

pub async fn sign_in(h: &TestHost, outbox: &Outbox, email: &str) -> SessionResponse {
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
