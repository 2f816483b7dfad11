//! End to end over real sockets: a host router on loopback, stand-in nodes on
//! loopback, calls through reqwest.

use cxmpute_core::testkit::{
    chat_price, expect_error, Behavior, StandInNode, TestHost, EMBED, MODEL,
};
use cxmpute_core::wire::{ErrorBody, Usage};
use cxmpute_core::*;
use serde_json::{json, Value};

async fn host() -> TestHost {
    TestHost::start_market(Credits(500)).await
}

fn chat_body(stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

#[tokio::test]
async fn plain_chat_is_charged_by_the_price_table_and_rewarded() {
    let h = host().await;
    let (node, p, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    let r = h
        .post("/v1/chat/completions", &key, &chat_body(false))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from a");
    // 1,000 + 10 input tokens x 1 + 5 output tokens x 2.
    assert_eq!(h.balance(&u.id).await, Credits(10_000_000 - 1_020));
    assert_eq!(h.earnings(&p.id).await, Credits(500));
    let usage = h.broker.store().usage_records(&u.id, 10).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].input_tokens, usage[0].output_tokens), (10, 5));
    assert_eq!(usage[0].charged, Credits(1_020));
    assert!(usage[0].success);
    let t = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!(
        (t.charged, t.rewarded, t.reserved),
        (Credits(1_020), Credits(500), Credits::ZERO)
    );
    assert_eq!(node.hits(), 1);
}

#[tokio::test]
async fn streamed_chat_passes_chunks_through_and_charges_reported_usage() {
    let h = host().await;
    let (_node, p, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    let r = h.post("/v1/chat/completions", &key, &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let mut content = String::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
    }
    assert_eq!(content, "Hello from the node");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    h.broker.flush_stats().await.unwrap();
    // Settling happens as the stream ends; wait for it through the store.
    wait_settled(&h, 1).await;
    assert_eq!(h.balance(&u.id).await, Credits(10_000_000 - 1_020));
    assert_eq!(h.earnings(&p.id).await, Credits(500));
}

/// Checks that `n` settlements are in the store. A streamed answer is
/// settled before its body ends, so having read the body is enough.
async fn wait_settled(h: &TestHost, n: u64) {
    assert_eq!(
        h.broker.store().ledger_totals().await.unwrap().settlements,
        n
    );
}

#[tokio::test]
async fn embeddings_are_charged_by_input_tokens() {
    let h = host().await;
    h.broker
        .admin()
        .put_price(PriceEntry {
            service: Service::Embeddings,
            model: Some(EMBED.into()),
            per_request: Credits(7),
            per_million_input_tokens: Credits(3_000_000),
            per_million_output_tokens: Credits::ZERO,
            per_million_units: Credits::ZERO,
        })
        .await
        .unwrap();
    let (_node, _, _) = h.stand_in("e", Service::Embeddings, EMBED).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    let body = json!({"model": EMBED, "input": ["one", "two"]});
    let r = h.post("/v1/embeddings", &key, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    // The node reports 10 prompt tokens, but the input is only 6 bytes: a node
    // cannot claim more tokens than the input has bytes. 7 + 6 x 3.
    assert_eq!(h.balance(&u.id).await, Credits(1_000_000 - 25));
}

async fn failover_case(bad: Behavior) {
    let h = host().await;
    let (_good, pg, _) = h.stand_in("good", Service::Chat, MODEL).await;
    let (badn, pb, _) = h.stand_in("bad", Service::Chat, MODEL).await;
    badn.set(bad.clone());
    let (u, key) = h.user(Credits::whole(10)).await;
    let n = 6;
    for _ in 0..n {
        let r = h
            .post("/v1/chat/completions", &key, &chat_body(false))
            .await;
        assert_eq!(r.status(), 200, "{bad:?}");
    }
    assert_eq!(h.balance(&u.id).await, Credits(10_000_000 - 1_020 * n));
    assert_eq!(h.earnings(&pg.id).await, Credits(500 * n));
    assert_eq!(
        h.earnings(&pb.id).await,
        Credits::ZERO,
        "the failing node earns nothing"
    );
}

#[tokio::test]
async fn failover_from_a_node_answering_500() {
    failover_case(Behavior::Status(500)).await;
}

#[tokio::test]
async fn failover_from_a_hanging_node() {
    failover_case(Behavior::Hang).await;
}

#[tokio::test]
async fn failover_from_a_node_sending_garbage() {
    failover_case(Behavior::Garbage).await;
}

#[tokio::test]
async fn failover_from_a_node_refusing_connections() {
    let h = host().await;
    let (_good, _, _) = h.stand_in("good", Service::Chat, MODEL).await;
    let (pb, _) = h.provider().await;
    let dead = StandInNode::dead_url().await;
    h.add_node_at(&pb, &dead, Service::Chat, MODEL, None).await;
    let (u, key) = h.user(Credits::whole(10)).await;
    for _ in 0..6 {
        let r = h
            .post("/v1/chat/completions", &key, &chat_body(false))
            .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(h.balance(&u.id).await, Credits(10_000_000 - 6 * 1_020));
    assert_eq!(h.earnings(&pb.id).await, Credits::ZERO);
}

#[tokio::test]
async fn every_node_failing_costs_nothing_and_says_why() {
    let h = host().await;
    let (a, p, _) = h.stand_in("a", Service::Chat, MODEL).await;
    a.set(Behavior::Status(500));
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat_body(false))
        .await;
    assert_eq!(r.status(), 502);
    let e: ErrorBody = r.json().await.unwrap();
    assert_eq!(e.error.code.as_deref(), Some("upstream_failed"));
    a.set(Behavior::Hang);
    let r = h.post("/v1/chat/completions", &key, &chat_body(true)).await;
    assert_eq!(r.status(), 504);
    assert_eq!(h.balance(&u.id).await, Credits::whole(1));
    assert_eq!(h.earnings(&p.id).await, Credits::ZERO);
    let t = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!((t.charged, t.reserved), (Credits::ZERO, Credits::ZERO));
}

#[tokio::test]
async fn a_stream_cut_after_the_first_byte_ends_with_an_error_event_and_charges_what_was_delivered()
{
    let h = host().await;
    let (node, p, _) = h.stand_in("cut", Service::Chat, MODEL).await;
    node.set(Behavior::CutStream(2));
    node.set_usage(None);
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h.post("/v1/chat/completions", &key, &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.len(), 3, "{text}");
    let last: Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert!(!text.contains("[DONE]"));
    wait_settled(&h, 1).await;
    // Input: ("hi" = 2 bytes + 16 per message) / 4, rounded up = 5 tokens x 1;
    // output: 2 delivered chunks x 2; no per-request fee; no reward.
    assert_eq!(h.balance(&u.id).await, Credits(1_000_000 - 9));
    assert_eq!(h.earnings(&p.id).await, Credits::ZERO);
}

#[tokio::test]
async fn a_stream_past_its_reserved_output_is_cut_there_and_charges_what_was_delivered() {
    let h = host().await;
    let (_node, p, _) = h.stand_in("chatty", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    // The node ignores the limit and sends its five content chunks at once:
    // the broker passes on the pieces it already has together, but still
    // checks each, so the stream ends where the third one passes the bound.
    let mut body = chat_body(true);
    body["max_tokens"] = json!(2);
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.len(), 3, "{text}");
    for (event, content) in events.iter().zip(["Hel", "lo"]) {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["choices"][0]["delta"]["content"], content, "{text}");
    }
    let last: Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted");
    let says = last["error"]["message"].as_str().unwrap();
    assert!(says.contains("more output than was asked for"), "{says}");
    assert!(
        !text.contains(" from") && !text.contains("[DONE]"),
        "{text}"
    );
    wait_settled(&h, 1).await;
    // Input 5 tokens x 1; output: the 2 reserved (and delivered) x 2; a
    // broken stream earns no reward.
    assert_eq!(h.balance(&u.id).await, Credits(1_000_000 - 9));
    assert_eq!(h.earnings(&p.id).await, Credits::ZERO);
    h.assert_ledger().await;
}

#[tokio::test]
async fn concurrent_calls_never_overspend() {
    let h = host().await;
    h.broker
        .admin()
        .put_price(PriceEntry {
            per_million_input_tokens: Credits::ZERO,
            per_million_output_tokens: Credits::ZERO,
            ..chat_price()
        })
        .await
        .unwrap();
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    // Covers exactly 50 calls at 1,000 each.
    let (u, key) = h.user(Credits(50_000)).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (client, url, key) = (client.clone(), h.url.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key.expose())
                .json(&chat_body(false))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            402 => refused += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((ok, refused), (50, 150));
    assert_eq!(h.balance(&u.id).await, Credits::ZERO);
    let t = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!(t.settlements, 50);
    assert_eq!(t.charged, Credits(50_000));
    assert_eq!(node.hits(), 50);
    h.assert_ledger().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_4xx_and_costs_nothing() {
    let h = host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", h.url);
    let raw = |body: &'static str| {
        c.post(&url)
            .bearer_auth(key.expose())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Every error answer says what was wrong.
    for body in [
        "{not json",
        r#"{"model": "llama3.2:3b"}"#,
        r#"{"model": 5, "messages": []}"#,
        r#"{"model": "llama3.2:3b", "messages": "hi"}"#,
        r#"{"model": "llama3.2:3b", "messages": []}"#,
        r#"{"model": "llama3.2:3b", "messages": [{"role": "wizard", "content": "x"}]}"#,
        "",
    ] {
        let m = expect_error(raw(body).await.unwrap(), 400, "invalid_request").await;
        assert!(!m.is_empty(), "{body}");
    }
    let unknown = json!({"model": "nope:1b", "messages": [{"role": "user", "content": "x"}]});
    let r = h.post("/v1/chat/completions", &key, &unknown).await;
    assert!(!expect_error(r, 404, "model_not_found").await.is_empty());
    let huge =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(5 << 20)}]});
    let r = h.post("/v1/chat/completions", &key, &huge).await;
    assert!(!expect_error(r, 413, "payload_too_large").await.is_empty());
    let none = c.post(&url).json(&chat_body(false)).send().await.unwrap();
    assert!(!expect_error(none, 401, "invalid_api_key").await.is_empty());
    let wrong = h
        .post(
            "/v1/chat/completions",
            &Secret::new("cx-wrong"),
            &chat_body(false),
        )
        .await;
    assert!(!expect_error(wrong, 401, "invalid_api_key").await.is_empty());
    let bad_emb = json!({"model": "x", "input": []});
    let r = h.post("/v1/embeddings", &key, &bad_emb).await;
    assert!(!expect_error(r, 400, "invalid_request").await.is_empty());
    let r = c.get(format!("{}/v1/nothing", h.url)).send().await.unwrap();
    assert!(!expect_error(r, 404, "not_found").await.is_empty());
    assert_eq!(h.balance(&u.id).await, Credits::whole(1));
    assert_eq!(node.hits(), 0);
}

#[tokio::test]
async fn credits_and_key_limits_are_refused_with_402_and_429() {
    let h = host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (poor, key) = h.user(Credits(10)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat_body(false))
        .await;
    assert!(!expect_error(r, 402, "insufficient_credits")
        .await
        .is_empty());
    h.broker
        .admin()
        .grant_credits(&poor.id, Credits::whole(100), "test", "top up")
        .await
        .unwrap();
    let (_, limited) = h
        .broker
        .admin()
        .create_api_key(&poor.id, "small", Some(Credits(100)), Vec::new())
        .await
        .unwrap();
    let r = h
        .post("/v1/chat/completions", &limited, &chat_body(false))
        .await;
    assert!(!expect_error(r, 429, "key_limit_reached").await.is_empty());
    let (_, embed_only) = h
        .broker
        .admin()
        .create_api_key(&poor.id, "emb", None, vec![Route::Embeddings])
        .await
        .unwrap();
    let r = h
        .post("/v1/chat/completions", &embed_only, &chat_body(false))
        .await;
    assert!(!expect_error(r, 403, "forbidden").await.is_empty());
    assert_eq!(node.hits(), 0);
}

#[tokio::test]
async fn no_healthy_node_is_503_and_models_lists_what_is_served() {
    let h = host().await;
    let (_node, _, id) = h.stand_in("a", Service::Chat, MODEL).await;
    let models: Value = reqwest::get(format!("{}/v1/models", h.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["nodes"], 1);
    h.set_node_healthy(&id, false);
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat_body(false))
        .await;
    assert!(!expect_error(r, 503, "no_capacity").await.is_empty());
    assert_eq!(h.balance(&u.id).await, Credits::whole(1));
    let health = reqwest::get(format!("{}/healthz", h.url)).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn a_node_usage_claim_above_the_bounds_is_clamped() {
    let h = host().await;
    let (node, _, _) = h.stand_in("greedy", Service::Chat, MODEL).await;
    node.set_usage(Some(Usage {
        prompt_tokens: 1_000_000,
        completion_tokens: 1_000_000,
        total_tokens: 0,
    }));
    let (u, key) = h.user(Credits::whole(10)).await;
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7});
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    let used = h.last_usage(&u.id).await;
    assert_eq!(used.output_tokens, 7, "at most max_tokens");
    assert!(used.input_tokens <= serde_json::to_vec(&body).unwrap().len() as u64);
}

#[tokio::test]
async fn provider_api_registers_heartbeats_and_ends_only_its_own_nodes() {
    let h = host().await;
    let node = StandInNode::start("a").await;
    let (_, key_a) = h.provider().await;
    let (_, key_b) = h.provider().await;
    let c = reqwest::Client::new();
    let reg = json!({"endpoint": node.url(), "services": [{"service": "chat", "model": MODEL}],
        "device": {"gpu": {"memory_mb": 24576}}, "location": {"country": "DE"}});
    let r = c
        .post(format!("{}/v1/provider/provisions", h.url))
        .bearer_auth(key_a.expose())
        .json(&reg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tier"], 4);
    assert_eq!(v["state"], "ready");
    let id = v["provision_id"].as_str().unwrap().to_owned();
    let hb = |k: &Secret| {
        c.post(format!("{}/v1/provider/provisions/{id}/heartbeat", h.url))
            .bearer_auth(k.expose())
            .send()
    };
    assert_eq!(hb(&key_a).await.unwrap().status(), 204);
    assert_eq!(
        hb(&key_b).await.unwrap().status(),
        404,
        "another provider's node"
    );
    assert_eq!(hb(&Secret::new("nope")).await.unwrap().status(), 401);
    let end = |k: &Secret| {
        c.delete(format!("{}/v1/provider/provisions/{id}", h.url))
            .bearer_auth(k.expose())
            .send()
    };
    assert_eq!(end(&key_b).await.unwrap().status(), 404);
    assert_eq!(h.broker.models().data.len(), 1);
    assert_eq!(end(&key_a).await.unwrap().status(), 204);
    assert!(
        h.broker.models().data.is_empty(),
        "an ended node leaves every pool"
    );
}

#[tokio::test]
async fn admin_routes_need_an_admin_key() {
    let h = host().await;
    let (u, user_key) = h.user(Credits::ZERO).await;
    let path = format!("/v1/admin/users/{}/credits", u.id);
    let grant = json!({"amount": 5_000_000, "reason": "welcome"});
    let r = h.post(&path, &user_key, &grant).await;
    assert_eq!(r.status(), 403);
    let r = h.post(&path, &h.admin_key, &grant).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.balance(&u.id).await, Credits::whole(5));
    let new_user = json!({"email": "New@Example.com", "credits": 1});
    let r = h.post("/v1/admin/users", &h.admin_key, &new_user).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["api_key"].as_str().unwrap().starts_with("cx-"));
    let same = json!({"email": "new@example.com"});
    let again = h.post("/v1/admin/users", &h.admin_key, &same).await;
    assert_eq!(again.status(), 409);
}

#[tokio::test]
async fn a_client_going_away_cancels_the_upstream_call_and_pays_for_what_was_delivered() {
    let h = host().await;
    let (node, p, _) = h.stand_in("stall", Service::Chat, MODEL).await;
    node.set(Behavior::StallStream(2));
    node.set_usage(None);
    let (u, key) = h.user(Credits::whole(1)).await;
    let mut r = h.post("/v1/chat/completions", &key, &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"data: "));
    drop(r);
    // The broker drops its upstream request; the node sees its answer abandoned.
    tokio::time::timeout(std::time::Duration::from_secs(10), node.abandoned())
        .await
        .expect("the upstream call is cancelled");
    // The settlement follows the cancellation in the same task.
    let mut settled = None;
    for _ in 0..1000 {
        let recs = h.broker.store().usage_records(&u.id, 1).await.unwrap();
        if let Some(r) = recs.into_iter().next() {
            settled = Some(r);
            break;
        }
        tokio::task::yield_now().await;
    }
    let rec = settled.expect("settled after the client left");
    assert_eq!(rec.output_tokens, 2, "two chunks were delivered");
    // 1,000 per request + 5 input tokens x 1 + 2 output tokens x 2.
    assert_eq!(rec.charged, Credits(1_009));
    assert_eq!(h.balance(&u.id).await, Credits(1_000_000 - 1_009));
    assert_eq!(h.earnings(&p.id).await, Credits(500));
}

#[tokio::test]
async fn a_lone_node_refusing_the_request_is_a_400_in_the_brokers_words_and_costs_nothing() {
    let h = host().await;
    let (node, p, id) = h.stand_in("strict", Service::Chat, MODEL).await;
    node.set(Behavior::Status(400));
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &key, &chat_body(false))
        .await;
    assert_eq!(r.status(), 400);
    let e: ErrorBody = r.json().await.unwrap();
    assert!(
        !e.error.message.contains("scripted failure"),
        "a node's words reached the caller: {}",
        e.error.message
    );
    assert_eq!(node.hits(), 1, "no other node to confirm it with");
    assert!(
        h.is_routable(&id),
        "an unconfirmed refusal is not the node's failure"
    );
    assert_eq!(h.balance(&u.id).await, Credits::whole(1));
    assert_eq!(h.earnings(&p.id).await, Credits::ZERO);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_preferred_region_routes_to_nodes_there_and_falls_back_elsewhere() {
    let h = host().await;
    let de = StandInNode::start("de").await;
    let us = StandInNode::start("us").await;
    let (p, _) = h.provider().await;
    for (node, country) in [(&de, "DE"), (&us, "US")] {
        let req = wire::RegisterProvisionRequest {
            endpoint: Some(node.url()),
            services: vec![wire::ServedModel {
                service: Service::Chat,
                model: MODEL.into(),
            }],
            device: json!({"gpu": {"memory_mb": 8192}}),
            location: Location {
                country: country.into(),
                ..Location::default()
            },
        };
        let r = h
            .broker
            .network()
            .register_provision(&p, req)
            .await
            .unwrap();
        node.require_secret(r.node_secret.expose());
    }
    let (_, key) = h.user(Credits::whole(10)).await;
    let call = |region: &'static str| {
        h.post_request("/v1/chat/completions", &key, &chat_body(false))
            .header("x-cxmpute-region", region)
            .send()
    };
    for _ in 0..8 {
        assert_eq!(call("de").await.unwrap().status(), 200);
    }
    assert_eq!((de.hits(), us.hits()), (8, 0));
    de.set(Behavior::Status(500));
    assert_eq!(
        call("DE").await.unwrap().status(),
        200,
        "falls back to another region"
    );
    assert_eq!(us.hits(), 1);
}

#[tokio::test]
async fn the_usage_chunk_reaches_only_callers_who_asked_for_it() {
    let h = host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;
    let usage_events = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter(|d| serde_json::from_str::<Value>(d).unwrap()["usage"].is_object())
            .count()
    };
    let plain = h.post("/v1/chat/completions", &key, &chat_body(true)).await;
    let text = plain.text().await.unwrap();
    assert_eq!(usage_events(&text), 0, "{text}");
    assert!(text.contains("Hel") && text.trim_end().ends_with("data: [DONE]"));
    let mut asked = chat_body(true);
    asked["stream_options"] = json!({"include_usage": true});
    let text = h
        .post("/v1/chat/completions", &key, &asked)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(usage_events(&text), 1, "{text}");
    // Both were metered by the node's usage all the same.
    assert_eq!(h.balance(&u.id).await, Credits(10_000_000 - 2 * 1_020));
}

#[test]
fn answers_carrying_secrets_redact_them_in_debug_but_not_on_the_wire() {
    let r = wire::CreateUserResponse {
        user_id: UserId::new("usr_1"),
        key_id: ApiKeyId::new("key_1"),
        api_key: Secret::new("cx-supersecretvalue"),
    };
    assert!(!format!("{r:?}").contains("supersecret"));
    assert!(serde_json::to_string(&r)
        .unwrap()
        .contains("cx-supersecretvalue"));
    let p = wire::CreateProviderResponse {
        provider_id: ProviderId::new("prv_1"),
        provider_key: Secret::new("cxp-supersecretvalue"),
    };
    assert!(!format!("{p:?}").contains("supersecret"));
}

// ---- what a request may ask of a node ------------------------------------------

/// A valid 1x1 PNG, base64.
const PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

fn ask(content: Value) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1})
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

#[tokio::test]
async fn every_choice_is_reserved_and_charged_and_n_is_capped() {
    let h = host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    // The node claims far more output than anyone could ask for: what it is
    // paid for is what the caller reserved.
    node.set_usage(Some(Usage {
        prompt_tokens: 1,
        completion_tokens: 1_000_000,
        total_tokens: 0,
    }));
    let (u, key) = h.user(Credits::whole(10)).await;
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 40, "n": 50});
    let r = h.post("/v1/chat/completions", &key, &body).await;
    let m = expect_error(r, 400, "invalid_request").await;
    assert!(m.contains("`n`") && m.contains('8'), "{m}");
    assert_eq!(node.hits(), 0);

    body["n"] = json!(4);
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(node.last_body().unwrap()["n"], 4);
    let used = h.last_usage(&u.id).await;
    assert_eq!(used.output_tokens, 4 * 40, "four whole completions");
    // 1,000 + 1 input token x 1 + 160 output tokens x 2.
    assert_eq!(used.charged, Credits(1_321));
    h.assert_ledger().await;
}

#[tokio::test]
async fn work_the_price_does_not_cover_is_refused_before_any_node() {
    let h = host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    for (field, value, says) in [
        ("best_of", json!(8), "best_of"),
        ("audio", json!({"voice": "alloy", "format": "wav"}), "audio"),
        ("modalities", json!(["text", "audio"]), "modalities"),
        ("web_search_options", json!({}), "web search"),
        (
            "tools",
            json!([{"type": "mcp", "server_url": "http://169.254.169.254/"}]),
            "tools[0]",
        ),
        ("top_logprobs", json!(1000), "top_logprobs"),
    ] {
        let mut body = chat_body(false);
        body[field] = value;
        let r = h.post("/v1/chat/completions", &key, &body).await;
        let m = expect_error(r, 400, "invalid_request").await;
        assert!(m.contains(says), "{field}: {m}");
    }
    assert_eq!(node.hits(), 0);
    assert_eq!(h.balance(&u.id).await, Credits::whole(1));
    h.assert_ledger().await;
}

#[tokio::test]
async fn the_node_receives_exactly_the_output_limit_that_was_reserved() {
    let h = host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    // What a node obeying `max_tokens: 2000` would report.
    node.set_usage(Some(Usage {
        prompt_tokens: 10,
        completion_tokens: 2_000,
        total_tokens: 2_010,
    }));
    let (u, key) = h.user(Credits::whole(10)).await;
    let mut body = chat_body(false);
    body["max_completion_tokens"] = json!(1);
    body["max_tokens"] = json!(2_000);
    // Limits of particular servers (llama.cpp, Ollama, TGI, vLLM).
    body["n_predict"] = json!(100_000);
    body["options"] = json!({"num_predict": 100_000});
    body["max_new_tokens"] = json!(100_000);
    body["min_tokens"] = json!(500);
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    let sent = node.last_body().unwrap();
    assert_eq!(sent["max_completion_tokens"], 1, "{sent}");
    assert_eq!(sent["max_tokens"], 1, "{sent}");
    for other in ["n_predict", "options", "max_new_tokens", "min_tokens"] {
        assert!(
            sent.get(other).is_none(),
            "{other} reached the node: {sent}"
        );
    }
    // The node could produce one token, and that is what was paid for:
    // 1,000 + 10 input tokens x 1 + 1 output token x 2.
    let used = h.last_usage(&u.id).await;
    assert_eq!((used.output_tokens, used.charged), (1, Credits(1_012)));

    // No limit given: the default, reserved and sent in both fields.
    let r = h.post("/v1/chat/completions", &key, &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let sent = node.last_body().unwrap();
    assert_eq!(
        (&sent["max_tokens"], &sent["max_completion_tokens"]),
        (&json!(4096), &json!(4096))
    );
    h.assert_ledger().await;
}

#[tokio::test]
async fn chat_image_urls_naming_private_places_are_refused_before_any_node() {
    let h = host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    for url in [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://localhost:11434/api/tags",
        "http://10.0.0.1/x.png",
        "file:///etc/passwd",
        "gopher://example.com/",
    ] {
        let body = ask(json!([{"type": "text", "text": "what?"}, image_part(url)]));
        let r = h.post("/v1/chat/completions", &key, &body).await;
        let m = expect_error(r, 400, "invalid_request").await;
        assert!(m.contains("messages[0].content[1]"), "{url}: {m}");
        // The older form, a bare string.
        let body = ask(json!([{"type": "image_url", "image_url": url}]));
        let r = h.post("/v1/chat/completions", &key, &body).await;
        expect_error(r, 400, "invalid_request").await;
    }
    assert_eq!(node.hits(), 0);
    assert_eq!(h.balance(&u.id).await, Credits::whole(1));

    // A public URL passes (the node fetches it through its own guard).
    let url = "https://images.example/cat.png";
    let r = h
        .post("/v1/chat/completions", &key, &ask(json!([image_part(url)])))
        .await;
    assert_eq!(r.status(), 200);
    let sent = node.last_body().unwrap();
    assert_eq!(sent["messages"][0]["content"][0]["image_url"]["url"], url);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_chat_image_is_reserved_and_charged_as_its_flat_figure() {
    let h = host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    // A node claiming a huge prompt is paid for the request's bound.
    node.set_usage(Some(Usage {
        prompt_tokens: 1_000_000,
        completion_tokens: 1,
        total_tokens: 0,
    }));
    let (u, key) = h.user(Credits::whole(10)).await;
    let data = format!("data:image/png;base64,{PNG_B64}");
    let body = ask(json!([{"type": "text", "text": "what is it?"}, image_part(&data)]));
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    let sent = node.last_body().unwrap();
    assert_eq!(sent["messages"][0]["content"][1]["image_url"]["url"], data);
    // The body's bytes stand for its text, the image for 1,024 tokens.
    let bytes = serde_json::to_vec(&body).unwrap().len() as u64;
    let used = h.last_usage(&u.id).await;
    assert_eq!(used.input_tokens, bytes - data.len() as u64 + 1_024);

    // Images over the size or the count cap, or not images at all.
    let big = format!("data:image/png;base64,{}", "A".repeat(3 << 20));
    let many: Vec<Value> = (0..9).map(|_| image_part(&data)).collect();
    for (content, says) in [
        (json!([image_part(&big)]), "larger than"),
        (Value::Array(many), "at most 8 images"),
        (
            json!([image_part("data:text/html;base64,PGgxPmhpPC9oMT4=")]),
            "not a PNG",
        ),
        (
            json!([{"type": "video_url", "video_url": {"url": "https://v.example/a.mp4"}}]),
            "video_url",
        ),
    ] {
        let r = h.post("/v1/chat/completions", &key, &ask(content)).await;
        let m = expect_error(r, 400, "invalid_request").await;
        assert!(m.contains(says), "{m}");
    }
    assert_eq!(node.hits(), 1);
    h.assert_ledger().await;
}

#[tokio::test]
async fn embeddings_pass_only_their_known_fields_to_the_node() {
    let h = host().await;
    let (node, _, _) = h.stand_in("e", Service::Embeddings, EMBED).await;
    let (_, key) = h.user(Credits::whole(1)).await;
    let body = json!({"model": EMBED, "input": "hi", "dimensions": 3,
        "options": {"num_ctx": 1_000_000}, "truncate_prompt_tokens": 5});
    let r = h.post("/v1/embeddings", &key, &body).await;
    assert_eq!(r.status(), 200);
    let sent = node.last_body().unwrap();
    assert_eq!(
        sent,
        json!({"model": EMBED, "input": "hi", "dimensions": 3})
    );
    for (field, value) in [("dimensions", json!(0)), ("encoding_format", json!("pdf"))] {
        let mut bad = json!({"model": EMBED, "input": "hi"});
        bad[field] = value;
        let r = h.post("/v1/embeddings", &key, &bad).await;
        let m = expect_error(r, 400, "invalid_request").await;
        assert!(m.contains(field), "{m}");
    }
    assert_eq!(node.hits(), 1);
    h.assert_ledger().await;
}
