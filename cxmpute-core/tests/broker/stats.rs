//! Usage statistics end to end: a scripted mix of calls over real sockets,
//! then the stats routes must add up exactly to what the ledger holds.

use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::stats::scope;
use cxmpute_core::testkit::{Behavior, InstrumentedStore, StandInNode, TestHost, EMBED, MODEL};
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

#[tokio::test]
async fn a_retried_flush_counts_nothing_twice() {
    // The store applies the first batch and then reports a failure: the
    // broker cannot tell, retries, and must not count twice.
    let store = Arc::new(InstrumentedStore::new());
    store.lose_next_answer("record_stats");
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
    assert_eq!(store.lost_answers(), 1);
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

/// Registers a node at `url` for `key`'s provider serving chat models
/// `{prefix}-0`... `{prefix}-{n-1}`, which the operator adds to the
/// catalogue first (a node may serve nothing else).
async fn register(h: &TestHost, key: &Secret, url: &str, prefix: &str, n: usize) {
    let services: Vec<Value> = (0..n)
        .map(|i| json!({"service": "chat", "model": format!("{prefix}-{i}")}))
        .collect();
    for i in 0..n {
        h.offer(Service::Chat, &format!("{prefix}-{i}")).await;
    }
    let body = json!({"endpoint": url, "services": services});
    assert_eq!(
        status(h, "/v1/provider/provisions", key, &body, None).await,
        200
    );
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e[key].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_public_network_picture_stays_small_whatever_strangers_register() {
    let h = TestHost::start_market(Credits(300)).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, pkey) = h.provider().await;
    let url = StandInNode::dead_url().await;
    for prefix in ["x", "y", "z"] {
        register(&h, &pkey, &url, prefix, 64).await;
    }
    let (_, key) = h.user(Credits::whole(10)).await;
    assert_eq!(
        status(&h, "/v1/chat/completions", &key, &chat(false), None).await,
        200
    );
    h.broker.record_network_snapshot();
    h.broker.flush_stats().await.unwrap();

    let limit = h.broker.config().public_list_limit;
    let (s, net) = get(&h, "/v1/stats/network", None).await;
    assert_eq!(s, 200, "{net}");
    assert_eq!(net["nodes_now"], 4);
    // Pools now: the catalogue's first, then the largest; the rest counted.
    let now = names(&net["pools_now"], "model");
    assert_eq!(now.len(), limit);
    assert!(now.iter().any(|m| m == MODEL));
    assert_eq!(n(&net["pools_now_omitted"]), (1 + 3 * 64 - limit) as u64);
    // Pool history is kept for the catalogue's pools only, and only they
    // can exist: a stranger's name is refused at registration, so it never
    // reaches the store. The history list is held to the bound too.
    let stranger = json!({"endpoint": url, "services": [{"service": "chat", "model": "mine-0"}]});
    assert_eq!(
        status(&h, "/v1/provider/provisions", &pkey, &stranger, None).await,
        400
    );
    assert_eq!(names(&net["pools"], "name").len(), limit);
    assert_eq!(n(&net["pools_omitted"]), (1 + 3 * 64 - limit) as u64);
    let rows = h
        .broker
        .store()
        .stats_by_prefix(
            scope::POOL_PREFIX,
            h.broker.now().day(),
            h.broker.now().day(),
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1 + 3 * 64);
    assert!(rows.iter().all(|(scope, _)| !scope.contains("mine-")));
    // The models list is held to the same bound.
    let models: Value = reqwest::get(format!("{}/v1/models", h.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids = names(&models["data"], "id");
    assert_eq!(ids.len(), limit);
    assert!(ids.iter().any(|m| m == MODEL));
    h.assert_ledger().await;

    // A small bound: the busiest models and the catalogue's pools are listed.
    let mut cfg = cxmpute_core::testkit::test_config();
    cfg.public_list_limit = 2;
    let h = TestHost::start_market_with(Arc::new(MemoryStore::new()), Credits(300), |b| {
        b.config(cfg)
    })
    .await;
    let mut nodes = Vec::new();
    h.offer(Service::Chat, "someones-own").await;
    for model in [MODEL, "llama3.2:1b", "someones-own"] {
        nodes.push(h.stand_in(model, Service::Chat, model).await);
    }
    let (_, key) = h.user(Credits::whole(10)).await;
    for (model, calls) in [(MODEL, 1), ("llama3.2:1b", 2), ("someones-own", 3)] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        for _ in 0..calls {
            assert_eq!(
                status(&h, "/v1/chat/completions", &key, &body, None).await,
                200
            );
        }
    }
    h.broker.flush_stats().await.unwrap();
    let (_, net) = get(&h, "/v1/stats/network", None).await;
    assert_eq!(
        names(&net["models"], "name"),
        ["chat:someones-own", "chat:llama3.2:1b"],
        "busiest first"
    );
    assert_eq!(n(&net["models_omitted"]), 1);
    let mut now = names(&net["pools_now"], "model");
    now.sort();
    assert_eq!(now, ["llama3.2:1b", MODEL], "the largest, then by name");
    assert_eq!(n(&net["pools_now_omitted"]), 1);
    h.assert_ledger().await;
}
