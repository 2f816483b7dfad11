//! Usage statistics end to end: a scripted mix of calls over real sockets,
//! then the stats routes must add up exactly to what the ledger holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cxmpute_core::stats::scope;
use cxmpute_core::testkit::{Behavior, StandInNode, TestHost, EMBED, MODEL};
use cxmpute_core::*;
use serde_json::{json, Value};

fn chat(stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

async fn call(
    h: &TestHost,
    path: &str,
    key: &Secret,
    body: &Value,
    app: Option<(&str, &str)>,
) -> (u16, String) {
    let mut r = h.post_request(path, key, body);
    if let Some((name, value)) = app {
        r = r.header(name, value);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    // Reading the whole body: a stream is settled before its body ends.
    let text = resp.text().await.unwrap_or_default();
    (status, text)
}

/// The status of [`call`].
async fn status(
    h: &TestHost,
    path: &str,
    key: &Secret,
    body: &Value,
    app: Option<(&str, &str)>,
) -> u16 {
    call(h, path, key, body, app).await.0
}

async fn get(h: &TestHost, path: &str, key: Option<&Secret>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(format!("{}{path}", h.url));
    if let Some(k) = key {
        r = r.bearer_auth(k.expose());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {list}"))
}

#[tokio::test]
async fn stats_add_up_exactly_after_a_mix_of_calls() {
    let h = TestHost::start_market(Credits(500)).await;
    let chat_node = StandInNode::start("a").await;
    let embed_node = StandInNode::start("e").await;
    let (p, pkey) = h.provider().await;
    let chat_id = h.add_node(&p, &chat_node, Service::Chat, MODEL).await;
    h.add_node(&p, &embed_node, Service::Embeddings, EMBED)
        .await;
    let start = Credits::whole(10);
    let (u, key) = h.user(start).await;
    let (other, other_key) = h.user(start).await;

    // Successes: 2 plain chats (one named app), 2 streams (another app), 1 embedding.
    let app1 = Some(("X-Title", "AppOne"));
    let app2 = Some(("HTTP-Referer", "https://two.example"));
    assert_eq!(
        status(&h, "/v1/chat/completions", &key, &chat(false), app1).await,
        200
    );
    assert_eq!(
        status(&h, "/v1/chat/completions", &key, &chat(false), None).await,
        200
    );
    for _ in 0..2 {
        let (s, body) = call(&h, "/v1/chat/completions", &key, &chat(true), app2).await;
        assert_eq!(s, 200);
        assert!(body.contains("[DONE]"));
    }
    let embed = json!({"model": EMBED, "input": "hello"});
    assert_eq!(status(&h, "/v1/embeddings", &key, &embed, None).await, 200);
    // Failures: the node answers 500 (nothing charged), then cuts a stream
    // half-way (input and delivered output charged, nothing rewarded).
    chat_node.set(Behavior::Status(500));
    assert_eq!(
        status(&h, "/v1/chat/completions", &key, &chat(false), app1).await,
        502
    );
    chat_node.set(Behavior::CutStream(2));
    let (s, body) = call(&h, "/v1/chat/completions", &key, &chat(true), None).await;
    assert_eq!(s, 200);
    assert!(body.contains("stream_interrupted"));
    chat_node.set(Behavior::Ok);
    // Refused before admission: never counted.
    let bad = Secret::new("sk-not-a-key");
    assert_eq!(
        status(&h, "/v1/chat/completions", &bad, &chat(false), None).await,
        401
    );
    let unknown =
        json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        status(&h, "/v1/chat/completions", &key, &unknown, None).await,
        404
    );
    // Another user's call: in the network's totals, not in ours.
    assert_eq!(
        status(&h, "/v1/chat/completions", &other_key, &chat(false), None).await,
        200
    );

    h.broker.record_network_snapshot();
    h.broker.flush_stats().await.unwrap();

    // The truth: the usage records the store settled.
    let records = h.broker.store().usage_records(&u.id, 100).await.unwrap();
    assert_eq!(records.len(), 7);
    let failures = records.iter().filter(|r| !r.success).count() as u64;
    assert_eq!(failures, 2);
    let sum = |f: fn(&UsageRecord) -> u64| records.iter().map(f).sum::<u64>();
    let charged: i64 = records.iter().map(|r| r.charged.0).sum();
    let balance = h.balance(&u.id).await;
    assert_eq!(Credits(start.0 - charged), balance);

    let (s, me) = get(&h, "/v1/stats/me", Some(&key)).await;
    assert_eq!(s, 200, "{me}");
    let t = &me["totals"];
    assert_eq!(n(&t["requests"]), 7);
    assert_eq!(n(&t["failures"]), 2);
    assert_eq!(n(&t["input_tokens"]), sum(|r| r.input_tokens));
    assert_eq!(n(&t["output_tokens"]), sum(|r| r.output_tokens));
    assert_eq!(t["charged"].as_i64(), Some(charged));
    assert!(t.get("rewarded").is_none(), "a user does not see rewards");
    assert!(t["p95_latency_ms"].is_u64() && t["tokens_per_second"].is_number());
    // One day with traffic, 29 empty ones before it.
    let days = me["days"].as_array().unwrap();
    assert_eq!(days.len(), 30);
    assert_eq!(
        days.last().unwrap()["day"],
        h.broker.now().day().to_string()
    );
    assert_eq!(n(&days.last().unwrap()["requests"]), 7);
    assert_eq!(days.iter().map(|d| n(&d["requests"])).sum::<u64>(), 7);
    // Per model and per application.
    assert_eq!(
        n(&named(&me["models"], &format!("chat:{MODEL}"))["requests"]),
        6
    );
    assert_eq!(
        n(&named(&me["models"], &format!("embeddings:{EMBED}"))["requests"]),
        1
    );
    assert_eq!(n(&named(&me["apps"], "AppOne")["requests"]), 2);
    assert_eq!(n(&named(&me["apps"], "AppOne")["failures"]), 1);
    assert_eq!(n(&named(&me["apps"], "https://two.example")["requests"]), 2);
    assert_eq!(me["apps"].as_array().unwrap().len(), 2);

    // The provider: served 7 of the 8 admitted calls (the 500 went nowhere).
    let earnings = h.earnings(&p.id).await;
    let (s, pv) = get(&h, "/v1/stats/provider", Some(&pkey)).await;
    assert_eq!(s, 200, "{pv}");
    assert_eq!(n(&pv["totals"]["requests"]), 7);
    assert_eq!(n(&pv["totals"]["failures"]), 1);
    assert_eq!(pv["totals"]["rewarded"].as_i64(), Some(earnings.0));
    assert_eq!(pv["earnings_total"].as_i64(), Some(earnings.0));
    // 500 per successful chat; a reward never exceeds its charge (the embedding's is tiny).
    let embedding = records
        .iter()
        .find(|r| r.route == Route::Embeddings)
        .unwrap();
    assert_eq!(earnings.0, 500 * 5 + embedding.charged.0.min(500));
    assert!(
        pv["totals"].get("charged").is_none(),
        "a provider does not see charges"
    );
    let nodes = pv["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let cn = nodes
        .iter()
        .find(|x| x["provision_id"] == chat_id.as_str())
        .unwrap();
    assert_eq!((n(&cn["requests"]), n(&cn["failures"])), (6, 1));
    assert_eq!(cn["routable"], true);

    // The network: every admitted call of both users, no money.
    let (s, net) = get(&h, "/v1/stats/network", None).await;
    assert_eq!(s, 200, "{net}");
    assert_eq!(n(&net["totals"]["requests"]), 8);
    assert_eq!(n(&net["totals"]["failures"]), 2);
    assert!(net["totals"].get("charged").is_none());
    let ep = named(&net["endpoints"], "/v1/chat/completions");
    assert_eq!((n(&ep["requests"]), n(&ep["failures"])), (7, 2));
    assert_eq!(
        n(&named(&net["endpoints"], "/v1/embeddings")["requests"]),
        1
    );
    assert_eq!(n(&named(&net["services"], "chat")["requests"]), 7);
    assert_eq!(net["nodes_now"], 2);
    assert_eq!(
        n(&named(&net["pools"], &format!("chat:{MODEL}"))["samples"]),
        1
    );
    assert_eq!(
        named(&net["pools"], &format!("chat:{MODEL}"))["average"],
        1.0
    );
    assert_eq!(
        net["nodes"].as_array().unwrap().last().unwrap()["average"],
        2.0
    );
    let chat_nodes = net["nodes_by_service"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "chat")
        .unwrap();
    assert_eq!(
        chat_nodes["days"].as_array().unwrap().last().unwrap()["average"],
        1.0
    );

    // Operators: money included, and it matches the ledger.
    let ledger = h.broker.store().ledger_totals().await.unwrap();
    let (s, adm) = get(&h, "/v1/stats/admin", Some(&h.admin_key)).await;
    assert_eq!(s, 200, "{adm}");
    assert_eq!(n(&adm["totals"]["requests"]), 8);
    assert_eq!(adm["totals"]["charged"].as_i64(), Some(ledger.charged.0));
    assert_eq!(adm["totals"]["rewarded"].as_i64(), Some(ledger.rewarded.0));
    assert_eq!(adm["ledger"]["settlements"], 8);
    assert_eq!(adm["top_users"][0]["name"], u.id.as_str());
    assert_eq!(
        n(&named(&adm["top_users"], other.id.as_str())["requests"]),
        1
    );
    assert_eq!(n(&named(&adm["top_apps"], "AppOne")["requests"]), 2);

    // The histogram holds every request once.
    let day = h.broker.now().day();
    let rows = h
        .broker
        .store()
        .stats(scope::NETWORK, day, day)
        .await
        .unwrap();
    assert_eq!(rows[0].1.latency_buckets.iter().sum::<u64>(), 8);
}

#[tokio::test]
async fn days_are_kept_apart_and_ranges_are_checked() {
    let h = TestHost::start(Arc::new(MemoryStore::new())).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    let day1 = h.broker.now().day();
    assert_eq!(
        status(&h, "/v1/chat/completions", &key, &chat(false), None).await,
        200
    );
    h.clock.advance(Duration::from_secs(86_400));
    for _ in 0..2 {
        assert_eq!(
            status(&h, "/v1/chat/completions", &key, &chat(false), None).await,
            200
        );
    }
    h.broker.flush_stats().await.unwrap();
    let day2 = day1.plus_days(1);
    let q = format!("/v1/stats/me?from={day1}&to={day2}");
    let (s, me) = get(&h, &q, Some(&key)).await;
    assert_eq!(s, 200, "{me}");
    let days: Vec<(String, u64)> = me["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["day"].as_str().unwrap().to_owned(), n(&d["requests"])))
        .collect();
    assert_eq!(days, vec![(day1.to_string(), 1), (day2.to_string(), 2)]);
    let (_, only2) = get(
        &h,
        &format!("/v1/stats/me?from={day2}&to={day2}"),
        Some(&key),
    )
    .await;
    assert_eq!(n(&only2["totals"]["requests"]), 2);

    for bad in [
        "/v1/stats/network?from=2024-01-01&to=2025-06-01",
        "/v1/stats/network?from=2025-02-01&to=2025-01-01",
        "/v1/stats/network?from=2025-02-30",
        "/v1/stats/network?to=soon",
    ] {
        let (s, body) = get(&h, bad, None).await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let (s, _) = get(&h, "/v1/stats/network?from=2024-01-01&to=2024-12-31", None).await;
    assert_eq!(s, 200, "366 days are allowed");
}

#[tokio::test]
async fn stats_routes_check_who_is_asking() {
    let h = TestHost::start(Arc::new(MemoryStore::new())).await;
    let (_, key) = h.user(Credits::whole(1)).await;
    let (_, pkey) = h.provider().await;
    assert_eq!(get(&h, "/v1/stats/me", None).await.0, 401);
    assert_eq!(
        get(&h, "/v1/stats/me", Some(&Secret::new("sk-nope")))
            .await
            .0,
        401
    );
    assert_eq!(get(&h, "/v1/stats/provider", None).await.0, 401);
    assert_eq!(get(&h, "/v1/stats/provider", Some(&key)).await.0, 401);
    assert_eq!(get(&h, "/v1/stats/provider", Some(&pkey)).await.0, 200);
    assert_eq!(get(&h, "/v1/stats/admin", None).await.0, 401);
    assert_eq!(get(&h, "/v1/stats/admin", Some(&key)).await.0, 403);
    assert_eq!(get(&h, "/v1/stats/admin", Some(&h.admin_key)).await.0, 200);
    assert_eq!(get(&h, "/v1/stats/network", None).await.0, 200);
}

/// A store whose `record_stats` applies the batch and then reports a failure
/// once: the broker cannot tell, retries, and must not count twice.
struct LosesTheAnswer {
    inner: MemoryStore,
    failed_once: AtomicBool,
}

#[tokio::test]
async fn a_retried_flush_counts_nothing_twice() {
    let store = Arc::new(LosesTheAnswer {
        inner: MemoryStore::new(),
        failed_once: AtomicBool::new(false),
    });
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;
    for _ in 0..3 {
        assert_eq!(
            status(&h, "/v1/chat/completions", &key, &chat(false), None).await,
            200
        );
    }
    assert!(h.broker.flush_stats().await.is_err());
    assert!(store.failed_once.load(Ordering::SeqCst));
    // A call between the failed flush and its retry goes into a new batch.
    assert_eq!(
        status(&h, "/v1/chat/completions", &key, &chat(false), None).await,
        200
    );
    h.broker.flush_stats().await.unwrap();
    h.broker.flush_stats().await.unwrap();
    let day = h.broker.now().day();
    let rows = store
        .inner
        .stats(&scope::user(&u.id), day, day)
        .await
        .unwrap();
    assert_eq!(rows[0].1.requests, 4);
    let (_, me) = get(&h, "/v1/stats/me", Some(&key)).await;
    assert_eq!(n(&me["totals"]["requests"]), 4);
}

/// Delegates everything to a memory store; see [`LosesTheAnswer`].
#[async_trait]
impl Store for LosesTheAnswer {
    async fn record_stats(&self, batch: &StatsBatch) -> Result<()> {
        self.inner.record_stats(batch).await?;
        if !self.failed_once.swap(true, Ordering::SeqCst) {
            return Err(Error::Unavailable {
                message: "stats (the answer was lost)".into(),
                source: None,
            });
        }
        Ok(())
    }
    async fn create_user(&self, user: &User) -> Result<()> {
        self.inner.create_user(user).await
    }
    async fn user(&self, id: &UserId) -> Result<User> {
        self.inner.user(id).await
    }
    async fn user_by_email(&self, email: &str) -> Result<User> {
        self.inner.user_by_email(email).await
    }
    async fn search_users(&self, q: &str, limit: usize) -> Result<Vec<User>> {
        self.inner.search_users(q, limit).await
    }
    async fn set_user_suspended(&self, id: &UserId, s: Option<Suspension>) -> Result<()> {
        self.inner.set_user_suspended(id, s).await
    }
    async fn grant_credits(&self, g: &CreditGrant) -> Result<Credits> {
        self.inner.grant_credits(g).await
    }
    async fn credit_grants(&self, u: &UserId) -> Result<Vec<CreditGrant>> {
        self.inner.credit_grants(u).await
    }
    async fn create_api_key(&self, k: &ApiKey) -> Result<()> {
        self.inner.create_api_key(k).await
    }
    async fn api_key_by_hash(&self, h: &KeyHash) -> Result<ApiKey> {
        self.inner.api_key_by_hash(h).await
    }
    async fn api_keys(&self, u: &UserId) -> Result<Vec<ApiKey>> {
        self.inner.api_keys(u).await
    }
    async fn update_api_key(&self, id: &ApiKeyId, up: &ApiKeyUpdate) -> Result<ApiKey> {
        self.inner.update_api_key(id, up).await
    }
    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        self.inner.revoke_api_key(id, at).await
    }
    async fn create_provider(&self, p: &Provider) -> Result<()> {
        self.inner.create_provider(p).await
    }
    async fn provider(&self, id: &ProviderId) -> Result<Provider> {
        self.inner.provider(id).await
    }
    async fn provider_by_key_hash(&self, h: &KeyHash) -> Result<Provider> {
        self.inner.provider_by_key_hash(h).await
    }
    async fn provider_by_user(&self, u: &UserId) -> Result<Provider> {
        self.inner.provider_by_user(u).await
    }
    async fn rotate_provider_key(&self, id: &ProviderId, h: &KeyHash) -> Result<()> {
        self.inner.rotate_provider_key(id, h).await
    }
    async fn set_provider_suspended(&self, id: &ProviderId, s: Option<Suspension>) -> Result<()> {
        self.inner.set_provider_suspended(id, s).await
    }
    async fn create_provision(&self, p: &Provision, e: &[PoolEntry]) -> Result<()> {
        self.inner.create_provision(p, e).await
    }
    async fn provision(&self, id: &ProvisionId) -> Result<Provision> {
        self.inner.provision(id).await
    }
    async fn provisions_by_provider(&self, p: &ProviderId) -> Result<Vec<Provision>> {
        self.inner.provisions_by_provider(p).await
    }
    async fn provisions(&self) -> Result<Vec<Provision>> {
        self.inner.provisions().await
    }
    async fn update_provision(
        &self,
        id: &ProvisionId,
        st: ProvisionState,
        ep: Option<String>,
        e: &[PoolEntry],
    ) -> Result<()> {
        self.inner.update_provision(id, st, ep, e).await
    }
    async fn heartbeat(&self, id: &ProvisionId, at: Timestamp) -> Result<()> {
        self.inner.heartbeat(id, at).await
    }
    async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
        self.inner.delete_provision(id).await
    }
    async fn pool_entries(&self) -> Result<Vec<PoolEntry>> {
        self.inner.pool_entries().await
    }
    async fn expire_provisions(&self, before: Timestamp) -> Result<Vec<ProvisionId>> {
        self.inner.expire_provisions(before).await
    }
    async fn reserve(&self, r: &Reservation) -> Result<()> {
        self.inner.reserve(r).await
    }
    async fn settle(&self, s: &Settlement) -> Result<SettleOutcome> {
        self.inner.settle(s).await
    }
    async fn settlement(&self, r: &RequestId) -> Result<UsageRecord> {
        self.inner.settlement(r).await
    }
    async fn release_stale_reservations(&self, before: Timestamp) -> Result<u64> {
        self.inner.release_stale_reservations(before).await
    }
    async fn ledger_totals(&self) -> Result<LedgerTotals> {
        self.inner.ledger_totals().await
    }
    async fn usage_records(&self, u: &UserId, limit: usize) -> Result<Vec<UsageRecord>> {
        self.inner.usage_records(u, limit).await
    }
    async fn prices(&self) -> Result<Vec<PriceEntry>> {
        self.inner.prices().await
    }
    async fn put_price(&self, p: &PriceEntry) -> Result<()> {
        self.inner.put_price(p).await
    }
    async fn issue_login_code(&self, c: &LoginCode, w: Timestamp, m: u32) -> Result<()> {
        self.inner.issue_login_code(c, w, m).await
    }
    async fn verify_login_code(&self, e: &str, h: &KeyHash, now: Timestamp, m: u32) -> Result<()> {
        self.inner.verify_login_code(e, h, now, m).await
    }
    async fn create_refresh_token(&self, t: &RefreshToken) -> Result<()> {
        self.inner.create_refresh_token(t).await
    }
    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        self.inner.rotate_refresh_token(old, next, now).await
    }
    async fn revoke_token_family(&self, f: &TokenFamilyId) -> Result<()> {
        self.inner.revoke_token_family(f).await
    }
    async fn refresh_token_family(&self, h: &KeyHash) -> Result<TokenFamilyId> {
        self.inner.refresh_token_family(h).await
    }
    async fn put_notification(&self, x: &Notification) -> Result<()> {
        self.inner.put_notification(x).await
    }
    async fn delete_notification(&self, id: &NotificationId) -> Result<()> {
        self.inner.delete_notification(id).await
    }
    async fn notifications(&self) -> Result<Vec<Notification>> {
        self.inner.notifications().await
    }
    async fn stats(&self, s: &str, from: Day, to: Day) -> Result<Vec<(Day, StatsCounters)>> {
        self.inner.stats(s, from, to).await
    }
    async fn stats_by_prefix(
        &self,
        p: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(String, StatsCounters)>> {
        self.inner.stats_by_prefix(p, from, to).await
    }
}
