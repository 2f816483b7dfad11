//! The response cache over real sockets: a repeated call answered from the
//! cache (plainly, or replayed as a stream) with the same content, the node
//! called once, charged the cache price and rewarding nobody; canonical
//! equivalence; accounts kept apart unless an admin lets keys share; expiry
//! on the test clock; eviction under the byte cap; a key's default TTL.

use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::{test_config, Behavior, StandInNode, TestHost};
use cxmpute_core::*;
use serde_json::{json, Value};

use crate::common::{call, chat, expect_error, EMBED, MODEL};

const CACHE: &str = "x-cxmpute-cache";

/// What the market charges a `chat()` call (the stand-in reports 10 in, 5
/// out: 1,000 a request, 1 an input token, 2 an output token), and a hit
/// of it at the default 100 per mille, rounded up.
const CHARGE: i64 = 1_000 + 10 + 5 * 2;
const HIT: i64 = (CHARGE * 100 + 999) / 1000;

async fn market() -> (TestHost, StandInNode, Provider) {
    market_with(test_config()).await
}

async fn market_with(config: BrokerConfig) -> (TestHost, StandInNode, Provider) {
    let h = TestHost::start_market_with(Arc::new(MemoryStore::new()), Credits(500), move |b| {
        b.config(config)
    })
    .await;
    let node = StandInNode::start("a").await;
    let (p, _) = h.provider().await;
    h.add_node(&p, &node, Service::Chat, MODEL).await;
    (h, node, p)
}

/// A call of `path` with `body` (raw bytes, as sent) and the cache header.
async fn cached(
    h: &TestHost,
    key: &Secret,
    path: &str,
    body: impl Into<reqwest::Body>,
    directive: Option<&str>,
) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{}{path}", h.url))
        .bearer_auth(key.expose())
        .header("content-type", "application/json");
    if let Some(d) = directive {
        r = r.header(CACHE, d);
    }
    r.body(body).send().await.unwrap()
}

fn lookup(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get(CACHE)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// A plain call: its cache header and body.
async fn plain(
    h: &TestHost,
    key: &Secret,
    body: &Value,
    d: Option<&str>,
) -> (Option<String>, Value) {
    let r = cached(h, key, "/v1/chat/completions", body.to_string(), d).await;
    assert_eq!(r.status(), 200);
    let l = lookup(&r);
    (l, r.json().await.unwrap())
}

/// A stream's events (parsed), read to `[DONE]`, and its cache header.
async fn streamed(
    h: &TestHost,
    key: &Secret,
    body: &Value,
    d: Option<&str>,
) -> (Option<String>, Vec<Value>) {
    let r = cached(h, key, "/v1/chat/completions", body.to_string(), d).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let l = lookup(&r);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let events = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    (l, events)
}

/// What a stream said: each choice's content and finish reason, and its usage.
fn assembled(events: &[Value]) -> (String, String, Option<Value>) {
    let mut content = String::new();
    let mut finish = String::new();
    let mut usage = None;
    for e in events {
        assert_eq!(e["object"], "chat.completion.chunk", "{e}");
        for c in e["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                content.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_owned();
            }
        }
        if !e["usage"].is_null() {
            usage = Some(e["usage"].clone());
        }
    }
    (content, finish, usage)
}

/// The user's one usage record answered from the cache (`hit`) or not.
/// (The test clock stands still, so records are told apart by this, not by
/// their order.)
async fn record(h: &TestHost, user: &UserId, hit: bool) -> UsageRecord {
    let all = h.broker.store().usage_records(user, 100).await.unwrap();
    let mut found: Vec<_> = all.into_iter().filter(|r| r.cache_hit == hit).collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// A counter or gauge on `/metrics`.
async fn metric(h: &TestHost, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", h.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not on /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_repeated_call_is_answered_from_the_cache_at_the_cache_price() {
    let (h, node, p) = market().await;
    let (u, key) = h.user(Credits::whole(10)).await;
    let (first_lookup, first) = plain(&h, &key, &chat(), Some("ttl=600")).await;
    assert_eq!(first_lookup.as_deref(), Some("miss"));
    let miss = record(&h, &u.id, false).await;
    assert!(!miss.cache_hit);
    assert_eq!(miss.charged, Credits(CHARGE));

    let (l, again) = plain(&h, &key, &chat(), Some("ttl=600")).await;
    assert_eq!(l.as_deref(), Some("hit"));
    assert_eq!(again, first, "the same answer");
    assert_eq!(node.hits(), 1, "the node was called once");
    let hit = record(&h, &u.id, true).await;
    assert!(hit.cache_hit && hit.success);
    assert_eq!((hit.charged, hit.reward), (Credits(HIT), Credits::ZERO));
    assert_eq!((hit.provider_id, hit.provision_id), (None, None));
    assert_eq!(hit.model, MODEL);
    assert_eq!(
        h.balance(&u.id).await,
        Credits::whole(10).saturating_sub(Credits(CHARGE + HIT))
    );
    assert_eq!(h.earnings(&p.id).await, Credits(500), "one reward only");

    // No header and no default on the key: not cached, no header back.
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(lookup(&r), None);
    r.bytes().await.unwrap();
    // `no-store` skips the cache both ways.
    let (l, _) = plain(&h, &key, &chat(), Some("no-store")).await;
    assert_eq!(l, None);
    assert_eq!(node.hits(), 3);

    assert_eq!(metric(&h, "cxmpute_cache_hits_total").await, 1.0);
    assert_eq!(metric(&h, "cxmpute_cache_misses_total").await, 1.0);
    assert_eq!(metric(&h, "cxmpute_cache_entries").await, 1.0);
    assert!(metric(&h, "cxmpute_cache_bytes").await > 0.0);
    // The user sees the hit in its recent usage.
    let usage = h
        .broker
        .accounts()
        .usage(&h.broker.store().user(&u.id).await.unwrap(), 1)
        .await
        .unwrap();
    assert_eq!(usage.recent.iter().filter(|r| r.cache_hit).count(), 1);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_streamed_hit_replays_the_content_of_the_first_stream() {
    let (h, node, _) = market().await;
    let (u, key) = h.user(Credits::whole(10)).await;
    let mut body = chat();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (l, first) = streamed(&h, &key, &body, Some("ttl=60")).await;
    assert_eq!(l.as_deref(), Some("miss"));
    let (content, finish, usage) = assembled(&first);
    assert!(!content.is_empty());
    assert_eq!(finish, "stop");
    assert!(usage.is_some());

    let (l, replayed) = streamed(&h, &key, &body, Some("ttl=60")).await;
    assert_eq!(l.as_deref(), Some("hit"));
    assert_eq!(
        assembled(&replayed),
        (content.clone(), finish.clone(), usage.clone())
    );
    assert_eq!(replayed[0]["id"], first[0]["id"]);
    assert_eq!(replayed[0]["model"], first[0]["model"]);
    // Without usage asked for, the replay has no usage chunk.
    let mut no_usage = body.clone();
    no_usage.as_object_mut().unwrap().remove("stream_options");
    let (l, bare) = streamed(&h, &key, &no_usage, Some("ttl=60")).await;
    assert_eq!(l.as_deref(), Some("hit"));
    assert_eq!(assembled(&bare), (content.clone(), finish.clone(), None));

    // Asked plainly: the completion the stream assembled into.
    let (l, whole) = plain(&h, &key, &chat(), Some("ttl=60")).await;
    assert_eq!(l.as_deref(), Some("hit"));
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["content"], content.as_str());
    assert_eq!(whole["choices"][0]["finish_reason"], finish.as_str());
    assert_eq!(Some(whole["usage"].clone()), usage);
    assert_eq!(node.hits(), 1);
    let records = h.broker.store().usage_records(&u.id, 10).await.unwrap();
    let hits: Vec<_> = records.iter().filter(|r| r.cache_hit).collect();
    assert_eq!(hits.len(), 3);
    for hit in hits {
        assert_eq!((hit.charged, hit.reward), (Credits(HIT), Credits::ZERO));
        assert_eq!(hit.provider_id, None);
    }
    assert_eq!(record(&h, &u.id, false).await.charged, Credits(CHARGE));
    h.assert_ledger().await;
}

#[tokio::test]
async fn canonical_equivalents_hit_and_accounts_share_only_when_an_admin_lets_them() {
    let (h, node, _) = market().await;
    let (a, key_a) = h.user(Credits::whole(10)).await;
    let (b, key_b) = h.user(Credits::whole(10)).await;
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":5,"temperature":0}}"#
    );
    let r = cached(&h, &key_a, "/v1/chat/completions", body, Some("ttl=60")).await;
    assert_eq!(lookup(&r).as_deref(), Some("miss"));
    let first: Value = r.json().await.unwrap();
    // Reordered fields, whitespace, `stream: false` and `user`: the same call.
    let same = format!(
        "{{ \"temperature\" : 0 ,\n \"user\": \"someone\", \"stream\": false,\n\t\"messages\": [ {{ \"content\": \"hi\", \"role\": \"user\" }} ],\n \"max_tokens\": 5, \"model\": \"{MODEL}\" }}"
    );
    let r = cached(
        &h,
        &key_a,
        "/v1/chat/completions",
        same.clone(),
        Some("ttl=60"),
    )
    .await;
    assert_eq!(lookup(&r).as_deref(), Some("hit"));
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    // A value that changes the answer is another entry.
    let other = same.replace("\"temperature\" : 0", "\"temperature\" : 1");
    let r = cached(&h, &key_a, "/v1/chat/completions", other, Some("ttl=60")).await;
    assert_eq!(lookup(&r).as_deref(), Some("miss"));
    r.bytes().await.unwrap();
    assert_eq!(node.hits(), 2);

    // Another account does not see A's entries.
    let r = cached(
        &h,
        &key_b,
        "/v1/chat/completions",
        same.clone(),
        Some("ttl=60"),
    )
    .await;
    assert_eq!(lookup(&r).as_deref(), Some("miss"));
    r.bytes().await.unwrap();
    assert_eq!(node.hits(), 3);

    // An admin lets both keys share: one shared namespace.
    for user in [&a.id, &b.id] {
        let id = h.broker.store().api_keys(user).await.unwrap()[0].id.clone();
        let r = call(&h, "PATCH", format!("/v1/admin/keys/{id}"))
            .bearer(h.admin_key.expose())
            .json(json!({"cache_shared": true}))
            .send()
            .await;
        assert_eq!(r.status(), 200);
        let view: wire::ApiKeyView = r.json().await.unwrap();
        assert!(view.cache.shared);
    }
    let r = cached(
        &h,
        &key_a,
        "/v1/chat/completions",
        same.clone(),
        Some("ttl=60"),
    )
    .await;
    assert_eq!(
        lookup(&r).as_deref(),
        Some("miss"),
        "the shared namespace starts empty"
    );
    r.bytes().await.unwrap();
    let r = cached(&h, &key_b, "/v1/chat/completions", same, Some("ttl=60")).await;
    assert_eq!(lookup(&r).as_deref(), Some("hit"));
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(node.hits(), 4);
    let hit = record(&h, &b.id, true).await;
    assert!(hit.cache_hit);
    assert_eq!(hit.charged, Credits(HIT));
    h.assert_ledger().await;
}

#[tokio::test]
async fn entries_expire_on_the_brokers_clock() {
    let (h, node, _) = market().await;
    let (_, key) = h.user(Credits::whole(10)).await;
    assert_eq!(
        plain(&h, &key, &chat(), Some("ttl=60")).await.0.as_deref(),
        Some("miss")
    );
    h.clock.advance(Duration::from_secs(59));
    assert_eq!(
        plain(&h, &key, &chat(), Some("ttl=60")).await.0.as_deref(),
        Some("hit")
    );
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(
        plain(&h, &key, &chat(), Some("ttl=60")).await.0.as_deref(),
        Some("miss")
    );
    assert_eq!(node.hits(), 2);
    // The new answer is kept for its own TTL.
    assert_eq!(
        plain(&h, &key, &chat(), Some("ttl=5")).await.0.as_deref(),
        Some("hit")
    );
    h.assert_ledger().await;
}

#[tokio::test]
async fn entries_are_evicted_under_the_byte_cap() {
    // A plain answer of the stand-in is about 230 bytes, an entry that plus
    // 160: room for two, not three.
    let mut config = test_config();
    config.cache.max_bytes = 900;
    let (h, node, _) = market_with(config).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    for n in 0..5 {
        let mut body = chat();
        body["messages"][0]["content"] = json!(format!("prompt {n}"));
        let (l, _) = plain(&h, &key, &body, Some("ttl=600")).await;
        assert_eq!(l.as_deref(), Some("miss"));
    }
    assert_eq!(node.hits(), 5);
    let bytes = metric(&h, "cxmpute_cache_bytes").await;
    assert!(bytes > 0.0 && bytes <= 900.0, "{bytes} bytes");
    assert!(metric(&h, "cxmpute_cache_entries").await <= 2.0);
    assert!(metric(&h, "cxmpute_cache_evictions_total").await >= 3.0);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_keys_default_ttl_caches_calls_without_the_header() {
    let (h, node, _) = market().await;
    let (u, key) = h.user(Credits::whole(10)).await;
    let id = h.broker.store().api_keys(&u.id).await.unwrap()[0]
        .id
        .clone();
    let patch = |v: Value| {
        call(&h, "PATCH", format!("/v1/admin/keys/{id}"))
            .bearer(h.admin_key.expose())
            .json(v)
    };
    // Above the host's maximum (a day): refused.
    expect_error(
        patch(json!({"cache_ttl_secs": 86_401})).send().await,
        400,
        "invalid_request",
    )
    .await;
    let view: wire::ApiKeyView = patch(json!({"cache_ttl_secs": 300})).ok().await;
    assert_eq!(view.cache.ttl_secs, Some(300));
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    assert_eq!(lookup(&r).as_deref(), Some("miss"));
    r.bytes().await.unwrap();
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    assert_eq!(lookup(&r).as_deref(), Some("hit"));
    r.bytes().await.unwrap();
    // The call's own header wins over the key's default.
    assert_eq!(plain(&h, &key, &chat(), Some("no-store")).await.0, None);
    assert_eq!(node.hits(), 2);
    // A header the broker cannot read, or a TTL above the maximum: 400,
    // nothing held or forwarded.
    for bad in ["ttl=forever", "ttl=86401", "max-age=3"] {
        let r = cached(
            &h,
            &key,
            "/v1/chat/completions",
            chat().to_string(),
            Some(bad),
        )
        .await;
        let msg = expect_error(r, 400, "invalid_request").await;
        assert!(msg.contains("X-Cxmpute-Cache"), "{msg}");
    }
    assert_eq!(node.hits(), 2);
    // `null` removes the default.
    let view: wire::ApiKeyView = patch(json!({"cache_ttl_secs": null})).ok().await;
    assert_eq!(view.cache.ttl_secs, None);
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    assert_eq!(lookup(&r), None);
    r.bytes().await.unwrap();
    h.assert_ledger().await;
}

#[tokio::test]
async fn only_complete_answers_are_kept() {
    let (h, node, _) = market().await;
    let (_, key) = h.user(Credits::whole(10)).await;
    let mut body = chat();
    body["stream"] = json!(true);
    // A stream cut short is charged for what was passed on, and not kept.
    node.set(Behavior::CutStream(1));
    let r = cached(
        &h,
        &key,
        "/v1/chat/completions",
        body.to_string(),
        Some("ttl=60"),
    )
    .await;
    assert_eq!(lookup(&r).as_deref(), Some("miss"));
    let text = r.text().await.unwrap();
    assert!(text.contains("stream_interrupted"), "{text}");
    // A node failing costs nothing and leaves nothing.
    node.set(Behavior::Status(500));
    let r = cached(
        &h,
        &key,
        "/v1/chat/completions",
        chat().to_string(),
        Some("ttl=60"),
    )
    .await;
    assert_eq!(r.status(), 502);
    assert_eq!(lookup(&r).as_deref(), Some("miss"));
    node.set(Behavior::Ok);
    let before = node.hits();
    let (l, _) = streamed(&h, &key, &body, Some("ttl=60")).await;
    assert_eq!(l.as_deref(), Some("miss"));
    let (l, _) = streamed(&h, &key, &body, Some("ttl=60")).await;
    assert_eq!(l.as_deref(), Some("hit"));
    assert_eq!(node.hits(), before + 1);
    h.assert_ledger().await;
}

#[tokio::test]
async fn embeddings_are_cached_too() {
    let (h, _, p) = market().await;
    let node = StandInNode::start("e").await;
    h.add_node(&p, &node, Service::Embeddings, EMBED).await;
    let (u, key) = h.user(Credits::whole(10)).await;
    let body = json!({"model": EMBED, "input": ["a", "b"]}).to_string();
    let r = cached(&h, &key, "/v1/embeddings", body.clone(), Some("ttl=60")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(lookup(&r).as_deref(), Some("miss"));
    let first = r.bytes().await.unwrap();
    let charged = record(&h, &u.id, false).await.charged;
    let r = cached(&h, &key, "/v1/embeddings", body, Some("ttl=60")).await;
    assert_eq!(lookup(&r).as_deref(), Some("hit"));
    assert_eq!(r.bytes().await.unwrap(), first, "byte for byte");
    assert_eq!(node.hits(), 1);
    let hit = record(&h, &u.id, true).await;
    assert!(hit.cache_hit);
    assert_eq!(hit.charged, Credits((charged.0 * 100 + 999) / 1000));
    h.assert_ledger().await;
}
