//! Accounts over real sockets: sign-in by email code (through a real SMTP
//! server when the test script runs one), sessions, keys, provider accounts,
//! administration, and that no secret reaches a log or a `Debug` output.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use cxmpute_core::mail::{SmtpConfig, SmtpMailer, SmtpTls};
use cxmpute_core::sessions::RateLimit;
use cxmpute_core::testkit::{sign_in_code, SmtpSink, StandInNode, TestHost};
use cxmpute_core::wire::*;
use cxmpute_core::*;
use serde_json::{json, Value};

// ---- sign-in through a real SMTP server ------------------------------------------

fn code_in(mail: &str) -> String {
    let code = sign_in_code(mail).expect("a code in the mail");
    assert_eq!(code.len(), 8, "{mail}");
    let subject = mail
        .lines()
        .find(|l| l.starts_with("Subject:"))
        .expect("a subject");
    assert!(!subject.contains(&code), "the code is not in the subject");
    code
}

fn cookies(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_whole_sign_in_flow_through_a_real_smtp_server() {
    let Some(sink) = SmtpSink::from_env() else {
        return;
    };
    let mailer = sink.mailer();
    let h = host_with(mailer).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;

    let email = format!("smtp-{}@users.test", random_suffix());
    let mut seen = HashSet::new();

    // Request a code; it arrives by mail.
    let r = request_code(&h, &email).await;
    assert_eq!(r.status(), 202);
    let v: RequestCodeResponse = r.json().await.unwrap();
    assert_eq!((v.status.as_str(), v.expires_in), ("sent", 600));
    let mails = sink.new_mail(&email, &mut seen);
    assert_eq!(mails.len(), 1);
    let code = code_in(&mails[0]);

    // Verify: a session, as JSON and as cookies.
    let r = verify(&h, &email, &code).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let set = cookies(&r);
    assert_eq!(set.len(), 2, "{set:?}");
    for c in &set {
        for attr in ["HttpOnly", "Secure", "SameSite=Strict"] {
            assert!(c.contains(attr), "{c}");
        }
    }
    let s1: SessionResponse = r.json().await.unwrap();
    assert_eq!((s1.token_type.as_str(), s1.expires_in), ("Bearer", 900));
    assert!(set
        .iter()
        .any(|c| c.starts_with(&format!("cx_access={}", s1.access_token.expose()))));
    assert!(set
        .iter()
        .any(|c| c.starts_with("cx_refresh=") && c.contains("Path=/v1/auth")));

    // The session works as a bearer and as a cookie.
    let me: MeResponse = call(&h, "GET", "/v1/me")
        .bearer(s1.access_token.expose())
        .ok()
        .await;
    assert_eq!(
        (me.user_id.clone(), me.email.as_str()),
        (s1.user_id.clone(), email.as_str())
    );
    assert!(me.provider_id.is_some() && me.keys.is_empty() && !me.is_admin);
    let me2: MeResponse = call(&h, "GET", "/v1/me")
        .cookie(format!("cx_access={}", s1.access_token.expose()))
        .ok()
        .await;
    assert_eq!(me2.user_id, me.user_id);

    // Use it: a key, credits, a call through the gateway.
    grant(&h, &me.user_id, 1).await;
    let k: CreateKeyResponse = call(&h, "POST", "/v1/me/keys")
        .bearer(s1.access_token.expose())
        .json(json!({"name": "laptop"}))
        .ok()
        .await;
    let r = call(&h, "POST", "/v1/chat/completions")
        .bearer(k.api_key.expose())
        .json(chat())
        .send()
        .await;
    assert_eq!(r.status(), 200);

    // Refresh: new tokens; the old refresh token is used up.
    let s2: SessionResponse = call(&h, "POST", "/v1/auth/refresh")
        .json(json!({"refresh_token": s1.refresh_token.expose()}))
        .ok()
        .await;
    assert_ne!(s2.refresh_token, s1.refresh_token);
    assert_eq!(s2.user_id, s1.user_id);
    let me3: MeResponse = call(&h, "GET", "/v1/me")
        .bearer(s2.access_token.expose())
        .ok()
        .await;
    assert_eq!(me3.user_id, me.user_id);

    // Reuse of the old refresh token: the whole family is revoked.
    let r = call(&h, "POST", "/v1/auth/refresh")
        .json(json!({"refresh_token": s1.refresh_token.expose()}))
        .send()
        .await;
    expect_error(r, 401, "invalid_api_key").await;
    let r = call(&h, "POST", "/v1/auth/refresh")
        .cookie(format!("cx_refresh={}", s2.refresh_token.expose()))
        .send()
        .await;
    assert_eq!(r.status(), 401, "the newer token of the family is dead too");
    let r = call(&h, "GET", "/v1/me")
        .bearer(s2.access_token.expose())
        .send()
        .await;
    assert_eq!(r.status(), 401, "and so are its access tokens");

    // Sign in again: same account, not a second one.
    assert_eq!(request_code(&h, &email).await.status(), 202);
    let mails = sink.new_mail(&email, &mut seen);
    assert_eq!(mails.len(), 1);
    let code2 = code_in(&mails[0]);
    assert_ne!(code2, code);
    let s3: SessionResponse = verify(&h, &email, &code2).await.json().await.unwrap();
    assert_eq!(s3.user_id, s1.user_id);
    let found = h.broker.store().search_users(&email, 10).await.unwrap();
    assert_eq!(found.len(), 1);

    // Log out with the refresh cookie: both tokens stop, the cookies are cleared.
    let r = call(&h, "POST", "/v1/auth/logout")
        .cookie(format!("cx_refresh={}", s3.refresh_token.expose()))
        .send()
        .await;
    assert_eq!(r.status(), 204);
    let cleared = cookies(&r);
    assert_eq!(cleared.len(), 2);
    assert!(cleared.iter().all(|c| c.contains("Max-Age=0")));
    let r = call(&h, "POST", "/v1/auth/refresh")
        .json(json!({"refresh_token": s3.refresh_token.expose()}))
        .send()
        .await;
    assert_eq!(r.status(), 401);
    let r = call(&h, "GET", "/v1/me")
        .bearer(s3.access_token.expose())
        .send()
        .await;
    assert_eq!(r.status(), 401);
}

fn random_suffix() -> String {
    let k = Secret::generate(10);
    k.expose().to_lowercase()
}

#[tokio::test]
async fn an_unreachable_smtp_server_is_a_503_that_reveals_nothing() {
    let dead = StandInNode::dead_url().await;
    let port: u16 = dead.rsplit(':').next().unwrap().parse().unwrap();
    let mut cfg = SmtpConfig::new("127.0.0.1", "no-reply@cxmpute.test")
        .port(port)
        .tls(SmtpTls::None);
    cfg.timeout = Duration::from_secs(2);
    let h = host_with(Arc::new(SmtpMailer::new(&cfg).unwrap())).await;
    let r = request_code(&h, "someone@users.test").await;
    expect_error(r, 503, "unavailable").await;
}

// ---- codes -----------------------------------------------------------------------

#[tokio::test]
async fn the_answer_to_a_code_request_does_not_reveal_whether_the_account_exists() {
    let (h, outbox) = host().await;
    sign_in(&h, &outbox, "known@users.test").await;
    let a = request_code(&h, "known@users.test").await;
    let b = request_code(&h, "unknown@users.test").await;
    assert_eq!(a.status(), b.status());
    assert_eq!(a.text().await.unwrap(), b.text().await.unwrap());
}

#[tokio::test]
async fn the_sixth_wrong_code_fails_even_with_the_right_code() {
    let (h, outbox) = host().await;
    let email = "brute@users.test";
    assert_eq!(request_code(&h, email).await.status(), 202);
    let right = outbox.last_code(email);
    let wrong = if right == "00000000" {
        "11111111"
    } else {
        "00000000"
    };
    for _ in 0..5 {
        expect_error(verify(&h, email, wrong).await, 401, "invalid_api_key").await;
    }
    expect_error(verify(&h, email, &right).await, 401, "invalid_api_key").await;
    // A new code starts a new count.
    assert_eq!(request_code(&h, email).await.status(), 202);
    assert_eq!(
        verify(&h, email, &outbox.last_code(email)).await.status(),
        200
    );
}

#[tokio::test]
async fn expired_and_used_codes_fail() {
    let (h, outbox) = host().await;
    let email = "late@users.test";
    assert_eq!(request_code(&h, email).await.status(), 202);
    let code = outbox.last_code(email);
    h.clock.advance(Duration::from_secs(10 * 60));
    expect_error(verify(&h, email, &code).await, 401, "invalid_api_key").await;

    assert_eq!(request_code(&h, email).await.status(), 202);
    let code = outbox.last_code(email);
    h.clock.advance(Duration::from_secs(10 * 60 - 1));
    assert_eq!(verify(&h, email, &code).await.status(), 200);
    expect_error(verify(&h, email, &code).await, 401, "invalid_api_key").await;
    // Codes are for the email they were sent to.
    assert_eq!(request_code(&h, email).await.status(), 202);
    let code = outbox.last_code(email);
    expect_error(
        verify(&h, "other@users.test", &code).await,
        401,
        "invalid_api_key",
    )
    .await;
}

#[tokio::test]
async fn code_requests_are_rate_limited_per_email() {
    let (h, _outbox) = host().await;
    for _ in 0..5 {
        assert_eq!(request_code(&h, "busy@users.test").await.status(), 202);
    }
    let r = request_code(&h, "busy@users.test").await;
    assert!(r.headers().contains_key("retry-after"));
    expect_error(r, 429, "rate_limited").await;
    // Other emails are not affected; the window passes.
    assert_eq!(request_code(&h, "calm@users.test").await.status(), 202);
    h.clock.advance(Duration::from_secs(3601));
    assert_eq!(request_code(&h, "busy@users.test").await.status(), 202);
}

/// A mailer that records who was sent a code (the code itself is not needed).
#[derive(Clone, Default)]
struct Outbox(Arc<parking_lot::Mutex<Vec<String>>>);

impl Outbox {
    fn sent(&self) -> usize {
        self.0.lock().len()
    }
}

#[async_trait::async_trait]
impl Mailer for Outbox {
    async fn send_login_code(&self, email: &str, _code: &Secret) -> Result<()> {
        self.0.lock().push(email.to_owned());
        Ok(())
    }
}

/// A host on `store` mailing through `mailer`, its sign-in settings changed by `f`.
async fn host_with_auth(
    store: Arc<dyn Store>,
    mailer: Arc<dyn Mailer>,
    f: impl FnOnce(&mut AuthConfig),
) -> TestHost {
    let mut a = auth();
    f(&mut a);
    TestHost::start_market_with(store, Credits(500), move |b| b.mailer(mailer).auth(a)).await
}

/// A host whose sign-in limits are set by `f`, and its outbox.
async fn limited_host(f: impl FnOnce(&mut AuthConfig)) -> (TestHost, Outbox) {
    let outbox = Outbox::default();
    let store = Arc::new(MemoryStore::new());
    (
        host_with_auth(store, Arc::new(outbox.clone()), f).await,
        outbox,
    )
}

/// Asks for a code for `email` from the loopback address `from`.
async fn code_from(h: &TestHost, from: [u8; 4], email: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap()
        .post(format!("{}/v1/auth/code", h.url))
        .json(&json!({ "email": email }))
        .send()
        .await
        .unwrap()
}

const ONE: [u8; 4] = [127, 0, 0, 1];
const TWO: [u8; 4] = [127, 0, 0, 2];

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn one_client_cannot_have_codes_mailed_to_any_number_of_addresses() {
    // Three at once, then one a minute.
    let (h, outbox) = limited_host(|a| {
        a.codes_per_client = RateLimit::new(3, Duration::from_secs(180));
    })
    .await;
    for i in 0..3 {
        let r = code_from(&h, ONE, &format!("victim{i}@users.test")).await;
        assert_eq!(r.status(), 202);
    }
    let r = code_from(&h, ONE, "victim3@users.test").await;
    assert_eq!(retry_after(&r), 60);
    expect_error(r, 429, "rate_limited").await;
    assert_eq!(outbox.sent(), 3, "nothing is mailed over the limit");
    // Another client is not held back by this one.
    assert_eq!(code_from(&h, TWO, "someone@users.test").await.status(), 202);
    // A minute later, one more; then the limit again.
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(code_from(&h, ONE, "victim3@users.test").await.status(), 202);
    expect_error(
        code_from(&h, ONE, "victim4@users.test").await,
        429,
        "rate_limited",
    )
    .await;
    assert_eq!(outbox.sent(), 5);
}

async fn code_via_proxy(h: &TestHost, real_ip: &str, email: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/auth/code", h.url))
        .header("x-forwarded-for", real_ip)
        .json(&json!({ "email": email }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_client_is_the_address_it_names() {
    let limit = RateLimit::new(1, Duration::from_secs(60));
    let (h, _outbox) = limited_host(|a| {
        a.codes_per_client = limit;
        a.client_ip_header = Some("X-Forwarded-For".into());
    })
    .await;
    // The last address is the one the proxy appended; the first is the caller's word.
    let r = code_via_proxy(&h, "10.9.9.9, 198.51.100.1", "p1@users.test").await;
    assert_eq!(r.status(), 202);
    let r = code_via_proxy(&h, "10.9.9.8, 198.51.100.1", "p2@users.test").await;
    expect_error(r, 429, "rate_limited").await;
    let r = code_via_proxy(&h, "198.51.100.2", "p3@users.test").await;
    assert_eq!(r.status(), 202);

    // Without a trusted header configured, the header is nobody's word: the
    // peer address is the client, whatever the caller claims.
    let (h, _outbox) = limited_host(|a| a.codes_per_client = limit).await;
    assert_eq!(
        code_via_proxy(&h, "198.51.100.1", "q1@users.test")
            .await
            .status(),
        202
    );
    let r = code_via_proxy(&h, "198.51.100.2", "q2@users.test").await;
    expect_error(r, 429, "rate_limited").await;
}

#[tokio::test]
async fn codes_mailed_in_all_are_limited_whoever_asks() {
    // Four at once, then one a minute, across every client and address.
    let (h, outbox) = limited_host(|a| {
        a.codes_overall = RateLimit::new(4, Duration::from_secs(240));
    })
    .await;
    for (i, from) in [ONE, ONE, TWO, TWO].into_iter().enumerate() {
        let r = code_from(&h, from, &format!("many{i}@users.test")).await;
        assert_eq!(r.status(), 202);
    }
    for from in [ONE, TWO] {
        let r = code_from(&h, from, "one-more@users.test").await;
        assert_eq!(retry_after(&r), 60);
        let msg = expect_error(r, 429, "rate_limited").await;
        assert!(msg.contains("try again in 60 s"), "{msg}");
    }
    assert_eq!(outbox.sent(), 4);
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(
        code_from(&h, TWO, "one-more@users.test").await.status(),
        202
    );
    assert_eq!(outbox.sent(), 5);
}

#[tokio::test]
async fn maintenance_deletes_sign_in_codes_too_old_to_use_or_count() {
    let store = Arc::new(MemoryStore::new());
    let outbox = RecordingMailer::default();
    let h = host_on(store.clone(), Arc::new(outbox.clone())).await;
    for i in 0..3 {
        assert_eq!(
            request_code(&h, &format!("flood{i}@users.test"))
                .await
                .status(),
            202
        );
    }
    // Past the code lifetime and the per-email window (an hour): dead rows.
    h.clock.advance(Duration::from_secs(3600 + 1));
    assert_eq!(request_code(&h, "fresh@users.test").await.status(), 202);
    h.broker.run_maintenance().await.unwrap();
    // Only the fresh code is left for a sweep to find, and it still works.
    let code = outbox.last_code("fresh@users.test");
    assert_eq!(verify(&h, "fresh@users.test", &code).await.status(), 200);
    assert_eq!(request_code(&h, "fresh@users.test").await.status(), 202);
    let far = h.clock.now().plus(Duration::from_secs(86_400));
    assert_eq!(store.prune_login_codes(far).await.unwrap(), 1);
}

async fn refresh_with(h: &TestHost, token: &Secret) -> reqwest::Response {
    call(h, "POST", "/v1/auth/refresh")
        .json(json!({ "refresh_token": token.expose() }))
        .send()
        .await
}

#[tokio::test]
async fn a_session_cannot_refresh_without_end() {
    // Each refresh stores a token: two at once, then one a minute.
    let outbox = RecordingMailer::default();
    let store = Arc::new(MemoryStore::new());
    let h = host_with_auth(store, Arc::new(outbox.clone()), |a| {
        a.refreshes_per_session = RateLimit::new(2, Duration::from_secs(120));
    })
    .await;
    let mut s = sign_in(&h, &outbox, "looper@users.test").await;
    for _ in 0..2 {
        let r = refresh_with(&h, &s.refresh_token).await;
        assert_eq!(r.status(), 200);
        s = r.json().await.unwrap();
    }
    let r = refresh_with(&h, &s.refresh_token).await;
    assert_eq!(retry_after(&r), 60);
    expect_error(r, 429, "rate_limited").await;
    // The refused refresh used nothing up: the same token works a minute on,
    // and another session is not held back.
    let other = sign_in(&h, &outbox, "calm@users.test").await;
    assert_eq!(refresh_with(&h, &other.refresh_token).await.status(), 200);
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(refresh_with(&h, &s.refresh_token).await.status(), 200);
}

#[tokio::test]
async fn maintenance_deletes_expired_refresh_tokens() {
    let store = Arc::new(MemoryStore::new());
    let outbox = RecordingMailer::default();
    let h = host_on(store.clone(), Arc::new(outbox.clone())).await;
    let old = sign_in(&h, &outbox, "old@users.test").await;
    assert_eq!(refresh_with(&h, &old.refresh_token).await.status(), 200);
    // Past the refresh lifetime (30 days) both of its tokens are dead rows.
    h.clock.advance(Duration::from_secs(30 * 24 * 3600 + 1));
    let fresh = sign_in(&h, &outbox, "fresh@users.test").await;
    h.broker.run_maintenance().await.unwrap();
    assert_eq!(refresh_with(&h, &fresh.refresh_token).await.status(), 200);
    // What is left: the fresh session's used token and its new one.
    let far = h.clock.now().plus(Duration::from_secs(365 * 24 * 3600));
    assert_eq!(store.prune_refresh_tokens(far).await.unwrap(), 2);
}

#[tokio::test]
async fn bad_sign_in_input_gets_openai_errors() {
    let (h, _outbox) = host().await;
    for body in [
        json!({}),
        json!({"email": "not-an-email"}),
        json!({"email": "a@b.test\r\nBcc: x@y.test"}),
        json!({"email": 5}),
    ] {
        let r = call(&h, "POST", "/v1/auth/code").json(body).send().await;
        expect_error(r, 400, "invalid_request").await;
    }
    let r = call(&h, "POST", "/v1/auth/verify")
        .json(json!({"email": "a@b.test", "code": "x".repeat(600)}))
        .send()
        .await;
    expect_error(r, 400, "invalid_request").await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/auth/verify", h.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_request").await;
    let r = call(&h, "POST", "/v1/auth/refresh")
        .json(json!({"refresh_token": "cxr-usr_x-nonsense"}))
        .send()
        .await;
    expect_error(r, 401, "invalid_api_key").await;
}

#[tokio::test]
async fn concurrent_first_sign_ins_create_one_account() {
    let (h, outbox) = host().await;
    let email = "twice@users.test";
    let acc = h.broker.accounts();
    let all = futures::future::join_all((0..8).map(|_| acc.ensure_account(email))).await;
    let ids: HashSet<UserId> = all.into_iter().map(|u| u.unwrap().id).collect();
    assert_eq!(ids.len(), 1);
    let id = ids.into_iter().next().unwrap();
    let p = h.broker.store().provider_by_user(&id).await.unwrap();
    // Through HTTP: two verifications of one code race; one wins.
    let email2 = "race@users.test";
    assert_eq!(request_code(&h, email2).await.status(), 202);
    let code = outbox.last_code(email2);
    let (a, b) = tokio::join!(verify(&h, email2, &code), verify(&h, email2, &code));
    let mut st = [a.status().as_u16(), b.status().as_u16()];
    st.sort();
    assert_eq!(st, [200, 401]);
    assert_eq!(
        h.broker
            .store()
            .search_users("race@", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // A later sign-in finds the same user and provider.
    let s = sign_in(&h, &outbox, email).await;
    assert_eq!(s.user_id, id);
    assert_eq!(
        h.broker.store().provider_by_user(&id).await.unwrap().id,
        p.id
    );
}

// ---- the user's own account -------------------------------------------------------

#[tokio::test]
async fn keys_are_created_limited_restricted_and_revoked_by_their_owner() {
    let (h, outbox) = host().await;
    let node = StandInNode::start("a").await;
    let enode = StandInNode::start("e").await;
    let (p, _) = h.provider().await;
    h.add_node(&p, &node, Service::Chat, MODEL).await;
    h.add_node(&p, &enode, Service::Embeddings, EMBED).await;
    let s = sign_in(&h, &outbox, "keys@users.test").await;
    let tok = s.access_token.expose().to_owned();
    grant(&h, &s.user_id, 10).await;

    let r = call(&h, "POST", "/v1/me/keys")
        .bearer(&tok)
        .json(json!({"name": "embed only", "credit_limit": 5_000_000, "permitted_routes": ["/v1/embeddings"]}))
        .send()
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let k: CreateKeyResponse = r.json().await.unwrap();
    let secret = k.api_key.expose().to_owned();
    assert!(secret.starts_with(&k.key.prefix) && k.key.prefix.len() < secret.len());
    assert_eq!(k.key.credit_limit, Some(Credits::whole(5)));

    // Listed without the secret.
    let r = call(&h, "GET", "/v1/me/keys").bearer(&tok).send().await;
    let text = r.text().await.unwrap();
    assert!(!text.contains(&secret));
    let keys: Vec<ApiKeyView> = serde_json::from_str(&text).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].last_used_at, None);

    // Permitted routes are checked against the route actually called.
    let gw = |path: &'static str, body: Value| {
        let secret = secret.clone();
        let h = &h;
        async move { call(h, "POST", path).bearer(secret).json(body).send().await }
    };
    let embed = json!({"model": EMBED, "input": "hi"});
    expect_error(gw("/v1/chat/completions", chat()).await, 403, "forbidden").await;
    assert_eq!(gw("/v1/embeddings", embed.clone()).await.status(), 200);
    let keys: Vec<ApiKeyView> = call(&h, "GET", "/v1/me/keys").bearer(&tok).ok().await;
    assert!(keys[0].last_used_at.is_some());
    assert!(keys[0].credits_left < Some(Credits::whole(5)));

    let path = format!("/v1/me/keys/{}", k.key.key_id);
    let v: ApiKeyView = call(&h, "PATCH", &path)
        .bearer(&tok)
        .json(json!({"permitted_routes": ["/v1/chat/completions"], "name": "chat only"}))
        .ok()
        .await;
    assert_eq!(
        (v.name.as_str(), v.credit_limit),
        ("chat only", Some(Credits::whole(5)))
    );
    assert_eq!(gw("/v1/chat/completions", chat()).await.status(), 200);
    expect_error(gw("/v1/embeddings", embed).await, 403, "forbidden").await;

    // `null` removes the limit; bad values are 400s.
    let v: ApiKeyView = call(&h, "PATCH", &path)
        .bearer(&tok)
        .json(json!({"credit_limit": null}))
        .ok()
        .await;
    assert_eq!((v.credit_limit, v.credits_left), (None, None));
    for bad in [
        json!({"credit_limit": -1}),
        json!({"permitted_routes": ["/v1/bogus"]}),
        json!({"name": ""}),
        json!({"name": "x".repeat(101)}),
    ] {
        let r = call(&h, "PATCH", &path).bearer(&tok).json(bad).send().await;
        expect_error(r, 400, "invalid_request").await;
    }

    // Revoked: refused at once, gone from the list.
    assert_eq!(call(&h, "DELETE", &path).bearer(&tok).status().await, 204);
    expect_error(
        gw("/v1/chat/completions", chat()).await,
        401,
        "invalid_api_key",
    )
    .await;
    let keys: Vec<ApiKeyView> = call(&h, "GET", "/v1/me/keys").bearer(&tok).ok().await;
    assert!(keys.is_empty());
    assert_eq!(call(&h, "DELETE", &path).bearer(&tok).status().await, 404);
}

#[tokio::test]
async fn usage_is_summarised_per_day_and_per_service() {
    let (h, outbox) = host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let s = sign_in(&h, &outbox, "usage@users.test").await;
    let tok = s.access_token.expose();
    grant(&h, &s.user_id, 1).await;
    let k: CreateKeyResponse = call(&h, "POST", "/v1/me/keys")
        .bearer(tok)
        .json(json!({}))
        .ok()
        .await;
    for _ in 0..2 {
        let r = call(&h, "POST", "/v1/chat/completions")
            .bearer(k.api_key.expose())
            .json(chat())
            .send()
            .await;
        assert_eq!(r.status(), 200);
    }
    h.broker.flush_stats().await.unwrap();
    let u: UsageResponse = call(&h, "GET", "/v1/me/usage?days=7")
        .bearer(tok)
        .ok()
        .await;
    assert_eq!(u.days.len(), 7);
    assert_eq!(u.to, h.clock.now().day());
    let today = u.days.last().unwrap();
    // 1,000 + 10 input x 1 + 5 output x 2, twice.
    assert_eq!((today.requests, today.charged), (2, Credits(2_040)));
    assert!(u.days[..6].iter().all(|d| d.requests == 0));
    assert_eq!(u.services.len(), 1);
    assert_eq!(u.services[0].service, Service::Chat);
    assert_eq!(
        (u.services[0].requests, u.services[0].charged),
        (2, Credits(2_040))
    );
    assert_eq!(u.recent.len(), 2);
    assert_eq!(
        (u.recent[0].model.as_str(), u.recent[0].charged),
        (MODEL, Credits(1_020))
    );
    assert_eq!(u.recent[0].key_id, k.key.key_id);
    let me: MeResponse = call(&h, "GET", "/v1/me").bearer(tok).ok().await;
    assert_eq!(me.credits, Credits(1_000_000 - 2_040));
    for bad in [
        "/v1/me/usage?days=0",
        "/v1/me/usage?days=91",
        "/v1/me/usage?days=x",
    ] {
        let r = call(&h, "GET", bad).bearer(tok).send().await;
        expect_error(r, 400, "invalid_request").await;
    }
}

// ---- providers --------------------------------------------------------------------

#[tokio::test]
async fn a_provider_rotates_its_key_and_sees_its_earnings() {
    let (h, outbox) = host().await;
    let node = StandInNode::start("mine").await;
    let s = sign_in(&h, &outbox, "provider@users.test").await;
    let tok = s.access_token.expose();
    let acct: ProviderAccountResponse = call(&h, "GET", "/v1/provider/account")
        .bearer(tok)
        .ok()
        .await;
    assert_eq!(acct.user_id.as_ref(), Some(&s.user_id));
    assert_eq!((acct.earnings, acct.provisions), (Credits::ZERO, 0));

    // The key created with the account was never shown: rotating gives one.
    let k1: ProviderKeyResponse = call(&h, "POST", "/v1/provider/account/key")
        .bearer(tok)
        .ok()
        .await;
    assert_eq!(k1.provider_id, acct.provider_id);
    let reg: RegisterProvisionResponse = call(&h, "POST", "/v1/provider/provisions")
        .bearer(k1.provider_key.expose())
        .json(
            json!({"endpoint": node.url(), "services": [{"service": "chat", "model": MODEL}],
            "device": {"gpu": {"memory_mb": 8192}}}),
        )
        .ok()
        .await;
    node.require_secret(reg.node_secret.expose());
    let nodes: Vec<ProvisionView> = call(&h, "GET", "/v1/provider/account/provisions")
        .bearer(tok)
        .ok()
        .await;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].provision_id, reg.provision_id);

    // Rotating with the key itself: the old key stops at once.
    let k2: ProviderKeyResponse = call(&h, "POST", "/v1/provider/account/key")
        .bearer(k1.provider_key.expose())
        .ok()
        .await;
    let r = call(&h, "GET", "/v1/provider/provisions")
        .bearer(k1.provider_key.expose())
        .send()
        .await;
    expect_error(r, 401, "invalid_api_key").await;
    let acct2: ProviderAccountResponse = call(&h, "GET", "/v1/provider/account")
        .bearer(k2.provider_key.expose())
        .ok()
        .await;
    assert_eq!(
        (acct2.provider_id, acct2.provisions),
        (acct.provider_id.clone(), 1)
    );

    // Earnings: requests served by its node, today, in the last 30 days.
    let (_, user_key) = h.user(Credits::whole(1)).await;
    for _ in 0..3 {
        let r = call(&h, "POST", "/v1/chat/completions")
            .bearer(user_key.expose())
            .json(chat())
            .send()
            .await;
        assert_eq!(r.status(), 200);
    }
    h.broker.flush_stats().await.unwrap();
    let e: EarningsResponse = call(&h, "GET", "/v1/provider/account/earnings")
        .bearer(k2.provider_key.expose())
        .ok()
        .await;
    assert_eq!(e.total, Credits(1_500));
    assert_eq!(e.last_30_days, Credits(1_500));
    assert_eq!(e.days.len(), 30);
    let today = e.days.last().unwrap();
    assert_eq!(
        (today.day, today.requests, today.rewarded),
        (h.clock.now().day(), 3, Credits(1_500))
    );
    // A month later, the days have moved on but the unpaid total stays.
    h.clock.advance(Duration::from_secs(30 * 86_400));
    let e: EarningsResponse = call(&h, "GET", "/v1/provider/account/earnings")
        .bearer(k2.provider_key.expose())
        .ok()
        .await;
    assert_eq!((e.total, e.last_30_days), (Credits(1_500), Credits::ZERO));
}

// ---- administration -----------------------------------------------------------------

#[tokio::test]
async fn suspensions_refuse_keys_and_nodes_at_once_and_lift_cleanly() {
    let (h, outbox) = host().await;
    let node = StandInNode::start("a").await;
    let (p, pkey) = h.provider().await;
    h.add_node(&p, &node, Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    let boss = sign_in(&h, &outbox, BOSS).await;
    let admin = boss.access_token.expose();
    let gw = || {
        call(&h, "POST", "/v1/chat/completions")
            .bearer(key.expose())
            .json(chat())
    };
    assert_eq!(gw().status().await, 200);

    // A reason is required.
    let r = call(&h, "POST", format!("/v1/admin/users/{}/suspend", u.id))
        .bearer(admin)
        .json(json!({"reason": "  "}))
        .send()
        .await;
    expect_error(r, 400, "invalid_request").await;

    // The user: its keys are refused at once.
    let r = call(&h, "POST", format!("/v1/admin/users/{}/suspend", u.id))
        .bearer(admin)
        .json(json!({"reason": "chargeback"}))
        .send()
        .await;
    assert_eq!(r.status(), 204);
    expect_error(gw().send().await, 403, "forbidden").await;
    let d: AdminUserDetail = call(&h, "GET", format!("/v1/admin/users/{}", u.id))
        .bearer(admin)
        .ok()
        .await;
    let s = d.user.suspended.unwrap();
    assert_eq!(
        (s.reason.as_str(), s.by.as_str()),
        ("chargeback", boss.user_id.as_str())
    );
    let r = call(&h, "POST", format!("/v1/admin/users/{}/unsuspend", u.id))
        .bearer(admin)
        .send()
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(gw().status().await, 200);

    // The provider: its node leaves routing, its key is refused.
    let r = call(&h, "POST", format!("/v1/admin/providers/{}/suspend", p.id))
        .bearer(h.admin_key.expose())
        .json(json!({"reason": "bad answers"}))
        .send()
        .await;
    assert_eq!(r.status(), 204);
    expect_error(gw().send().await, 503, "no_capacity").await;
    let r = call(&h, "GET", "/v1/provider/provisions")
        .bearer(pkey.expose())
        .send()
        .await;
    expect_error(r, 403, "forbidden").await;
    let r = call(
        &h,
        "POST",
        format!("/v1/admin/providers/{}/unsuspend", p.id),
    )
    .bearer(h.admin_key.expose())
    .send()
    .await;
    assert_eq!(r.status(), 204);
    assert_eq!(gw().status().await, 200);
    let r = call(&h, "GET", "/v1/provider/provisions")
        .bearer(pkey.expose())
        .send()
        .await;
    assert_eq!(r.status(), 200);

    // Unknown accounts are 404s.
    let r = call(&h, "POST", "/v1/admin/users/usr_nobody/suspend")
        .bearer(admin)
        .json(json!({"reason": "x"}))
        .send()
        .await;
    expect_error(r, 404, "not_found").await;
}

#[tokio::test]
async fn admins_search_accounts_grant_credits_and_disconnect_nodes() {
    let (h, outbox) = host().await;
    let boss = sign_in(&h, &outbox, BOSS).await;
    let admin = boss.access_token.expose();
    let me: MeResponse = call(&h, "GET", "/v1/me").bearer(admin).ok().await;
    assert!(me.is_admin, "granted by configuration");
    let s = sign_in(&h, &outbox, "findme@users.test").await;
    sign_in(&h, &outbox, "other@users.test").await;

    let found: Vec<AdminUserView> = call(&h, "GET", "/v1/admin/users?q=FINDME")
        .bearer(admin)
        .ok()
        .await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].user_id, s.user_id);
    assert!(found[0].provider_id.is_some());
    let all: Vec<AdminUserView> = call(&h, "GET", "/v1/admin/users?limit=200")
        .bearer(admin)
        .ok()
        .await;
    assert!(all.len() >= 4);
    let r = call(&h, "GET", "/v1/admin/users?limit=0")
        .bearer(admin)
        .send()
        .await;
    expect_error(r, 400, "invalid_request").await;

    let b: BalanceResponse = call(&h, "POST", format!("/v1/admin/users/{}/credits", s.user_id))
        .bearer(admin)
        .json(json!({"amount": 2_000_000, "reason": "welcome"}))
        .ok()
        .await;
    assert_eq!(b.credits, Credits::whole(2));
    let r = call(&h, "POST", format!("/v1/admin/users/{}/credits", s.user_id))
        .bearer(admin)
        .json(json!({"amount": -3_000_000, "reason": "too much"}))
        .send()
        .await;
    expect_error(r, 402, "insufficient_credits").await;
    let d: AdminUserDetail = call(&h, "GET", format!("/v1/admin/users/{}", s.user_id))
        .bearer(admin)
        .ok()
        .await;
    assert_eq!(d.grants.len(), 1);
    assert_eq!(
        (d.grants[0].by.as_str(), d.grants[0].reason.as_str()),
        (boss.user_id.as_str(), "welcome")
    );

    let (_node, p, id) = h.stand_in("a", Service::Chat, MODEL).await;
    let nodes: Vec<AdminProvisionView> = call(&h, "GET", "/v1/admin/provisions")
        .bearer(admin)
        .ok()
        .await;
    assert!(nodes
        .iter()
        .any(|n| n.provision.provision_id == id && n.provider_id == p.id));
    let pv: AdminProviderView = call(&h, "GET", format!("/v1/admin/providers/{}", p.id))
        .bearer(admin)
        .ok()
        .await;
    assert_eq!(pv.provisions.len(), 1);
    let r = call(&h, "DELETE", format!("/v1/admin/provisions/{id}"))
        .bearer(admin)
        .send()
        .await;
    assert_eq!(r.status(), 204);
    assert!(h.broker.models().data.is_empty(), "the node left routing");
    let r = call(&h, "DELETE", format!("/v1/admin/provisions/{id}"))
        .bearer(admin)
        .send()
        .await;
    expect_error(r, 404, "not_found").await;
}

#[tokio::test]
async fn notifications_show_within_their_window_and_place() {
    let (h, _outbox) = host().await;
    let admin = h.admin_key.expose().to_owned();
    let now = h.clock.now();
    let hour = Duration::from_secs(3600);
    let create = |body: Value| {
        let admin = admin.clone();
        let h = &h;
        async move {
            call(h, "POST", "/v1/admin/notifications")
                .bearer(admin)
                .json(body)
                .send()
                .await
        }
    };
    let r = create(
        json!({"title": "Maintenance", "banner": "tonight", "starts_at": now.minus(hour),
        "ends_at": now.plus(hour), "placements": ["homepage", "user_dashboard"]}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let live: Notification = r.json().await.unwrap();
    let later: Notification = create(json!({"title": "New models", "starts_at": now.plus(hour),
        "ends_at": now.plus(hour * 3), "placements": ["provider_dashboard"]}))
    .await
    .json()
    .await
    .unwrap();
    for bad in [
        json!({"title": "x", "starts_at": 5, "ends_at": 5, "placements": ["homepage"]}),
        json!({"title": "", "starts_at": 1, "ends_at": 5, "placements": ["homepage"]}),
        json!({"title": "x", "starts_at": 1, "ends_at": 5, "placements": []}),
        json!({"title": "x", "starts_at": 1, "ends_at": 5, "placements": ["moon"]}),
    ] {
        expect_error(create(bad).await, 400, "invalid_request").await;
    }

    let active = |q: &'static str| {
        let h = &h;
        async move {
            let v: Vec<Notification> = call(h, "GET", format!("/v1/notifications{q}")).ok().await;
            v.into_iter().map(|n| n.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(active("").await, vec![live.id.clone()]);
    assert_eq!(
        active("?placement=user_dashboard").await,
        vec![live.id.clone()]
    );
    assert!(active("?placement=provider_dashboard").await.is_empty());
    let r = call(&h, "GET", "/v1/notifications?placement=moon")
        .send()
        .await;
    expect_error(r, 400, "invalid_request").await;

    h.clock.advance(hour * 2);
    assert_eq!(active("").await, vec![later.id.clone()]);
    // Edited and deleted by an admin.
    let edited: Notification = call(&h, "PUT", format!("/v1/admin/notifications/{}", later.id))
        .bearer(&admin)
        .json(
            json!({"title": "New models!", "starts_at": now, "ends_at": now.plus(hour * 5),
            "placements": ["homepage"]}),
        )
        .ok()
        .await;
    assert_eq!(
        (edited.id.clone(), edited.title.as_str()),
        (later.id.clone(), "New models!")
    );
    assert_eq!(active("?placement=homepage").await, vec![later.id.clone()]);
    let r = call(
        &h,
        "DELETE",
        format!("/v1/admin/notifications/{}", later.id),
    )
    .bearer(&admin)
    .send()
    .await;
    assert_eq!(r.status(), 204);
    assert!(active("").await.is_empty());
    let all: Vec<Notification> = call(&h, "GET", "/v1/admin/notifications")
        .bearer(&admin)
        .ok()
        .await;
    assert_eq!(all.len(), 1);
    let r = call(&h, "PUT", "/v1/admin/notifications/ntf_nope")
        .bearer(&admin)
        .json(json!({"title": "x", "starts_at": 1, "ends_at": 5, "placements": ["homepage"]}))
        .send()
        .await;
    expect_error(r, 404, "not_found").await;
}

// ---- secrets stay secret -------------------------------------------------------------

#[test]
fn debug_output_of_every_type_holding_a_secret_is_redacted() {
    let s = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t-99";
    let secret = || Secret::new(s);
    let user = UserId::new("usr_x");
    let shown: Vec<String> = vec![
        format!("{:?}", secret()),
        format!("{}", secret()),
        format!(
            "{:?}",
            SessionResponse {
                token_type: "Bearer".into(),
                access_token: secret(),
                expires_in: 1,
                refresh_token: secret(),
                refresh_expires_in: 1,
                user_id: user.clone(),
            }
        ),
        format!(
            "{:?}",
            VerifyCodeRequest {
                email: "a@b.test".into(),
                code: secret()
            }
        ),
        format!(
            "{:?}",
            RefreshRequest {
                refresh_token: Some(secret())
            }
        ),
        format!(
            "{:?}",
            ProviderKeyResponse {
                provider_id: ProviderId::new("prv_x"),
                provider_key: secret(),
            }
        ),
        format!(
            "{:?}",
            sessions::SessionTokens {
                user_id: user.clone(),
                access_token: secret(),
                access_expires_at: Timestamp(0),
                refresh_token: secret(),
                refresh_expires_at: Timestamp(0),
            }
        ),
        format!(
            "{:?}",
            sessions::Credentials {
                bearer: Some(secret()),
                access_cookie: Some(secret()),
            }
        ),
        format!("{:?}", AuthConfig::default().with_session_secret(secret())),
        format!("{:?}", {
            let mut c = BrokerConfig::default();
            c.auth = AuthConfig::default().with_session_secret(secret());
            c
        }),
        format!(
            "{:?}",
            CreateKeyResponse {
                key: ApiKeyView {
                    key_id: ApiKeyId::new("key_x"),
                    name: "k".into(),
                    prefix: "cx-s3cr".into(),
                    credit_limit: None,
                    credits_left: None,
                    permitted_routes: vec![],
                    created_at: Timestamp(0),
                    last_used_at: None,
                    rpm: None,
                    tpm: None,
                    budget: None,
                    cache: Default::default(),
                },
                api_key: secret(),
            }
        ),
        format!(
            "{:?}",
            MailerConfig::Smtp(SmtpConfig::new("smtp.test", "a@b.test").credentials("u", secret()))
        ),
        format!(
            "{:?}",
            SmtpMailer::new(&SmtpConfig::new("smtp.test", "a@b.test").credentials("u", secret()))
                .unwrap()
        ),
        format!(
            "{:?}",
            Provision {
                id: ProvisionId::new("node_x"),
                provider_id: ProviderId::new("prv_x"),
                endpoint: None,
                node_secret: s.into(),
                device: Value::Null,
                location: Location::default(),
                tier: 1,
                state: ProvisionState::Registered,
                last_heartbeat: Timestamp(0),
                created_at: Timestamp(0),
            }
        ),
    ];
    for d in &shown {
        assert!(!d.contains(s), "{d}");
    }
    // A key's Debug shows only a short prefix of its hash.
    let k = format!("{:?}", secret().hash());
    assert!(!k.contains(&secret().hash().to_hex()));
}
