//! Fallbacks (`models: [...]`) and aliases, over real sockets: a host on
//! loopback, stand-in nodes, calls as an OpenAI SDK would send them.

use cxmpute_core::testkit::{expect_error, Behavior, StandInNode, TestHost, EMBED, MODEL};
use cxmpute_core::*;
use serde_json::{json, Value};

/// A tier-1 chat model of the built-in catalogue that no node serves in
/// these tests unless one is started for it.
const SMALL: &str = "llama3.2:1b";

async fn host() -> TestHost {
    TestHost::start_market(Credits(500)).await
}

fn chat(models: &[&str], stream: bool) -> Value {
    json!({"models": models, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// What a plain call of [`MODEL`] costs at the test price: 1,000 + 10 input
/// tokens x 1 + 5 output tokens x 2.
const PLAIN: Credits = Credits(1_020);

#[tokio::test]
async fn the_next_model_serves_when_the_first_has_no_node() {
    let h = host().await;
    let (node, p, _) = h.stand_in("b", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    let r = h
        .post("/v1/chat/completions", &key, &chat(&[SMALL, MODEL], false))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    // The node was asked for the model it serves, and only that one.
    let sent = node.last_body().unwrap();
    assert_eq!(sent["model"], MODEL);
    assert!(sent.get("models").is_none(), "{sent}");
    assert_eq!(v["model"], MODEL);
    let usage = h.last_usage(&u.id).await;
    assert_eq!(usage.model, MODEL);
    assert_eq!(usage.requested_model.as_deref(), Some(SMALL));
    assert_eq!(usage.charged, PLAIN);
    assert_eq!(h.balance(&u.id).await, Credits(10_000_000 - PLAIN.0));
    assert_eq!(h.earnings(&p.id).await, Credits(500));

    // `model` comes first, then `models`; a name given twice keeps its
    // first place; the served model asked first is no fallback.
    let body = json!({"model": MODEL, "models": [MODEL, SMALL, MODEL],
        "messages": [{"role": "user", "content": "hi"}]});
    h.clock.advance(std::time::Duration::from_secs(1));
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.last_usage(&u.id).await.requested_model, None);
    h.assert_ledger().await;
}

#[tokio::test]
async fn the_next_model_serves_when_the_first_models_only_node_refuses_or_is_down() {
    let h = host().await;
    let (small, small_p, _) = h.stand_in("a", Service::Chat, SMALL).await;
    small.set(Behavior::Refuse("too long for me".into()));
    let (node, p, _) = h.stand_in("b", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    let r = h
        .post("/v1/chat/completions", &key, &chat(&[SMALL, MODEL], false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!((small.hits(), node.hits()), (1, 1));
    let usage = h.last_usage(&u.id).await;
    assert_eq!(
        (usage.model.as_str(), usage.requested_model.as_deref()),
        (MODEL, Some(SMALL))
    );
    assert_eq!(usage.provider_id.as_ref(), Some(&p.id));
    assert_eq!(h.earnings(&small_p.id).await, Credits::ZERO);

    // Embeddings too, past a node that is not there (connection refused).
    let (dead_p, _) = h.provider().await;
    let dead = StandInNode::dead_url().await;
    h.add_node_at(&dead_p, &dead, Service::Embeddings, "all-minilm", None)
        .await;
    let (emb, _, _) = h.stand_in("e", Service::Embeddings, EMBED).await;
    let body = json!({"models": ["all-minilm", EMBED], "input": "hello"});
    // Usage lists newest first, by the host's clock.
    h.clock.advance(std::time::Duration::from_secs(1));
    let r = h.post("/v1/embeddings", &key, &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], EMBED);
    assert_eq!(emb.last_body().unwrap()["model"], EMBED);
    let usage = h.last_usage(&u.id).await;
    assert_eq!(
        (usage.model.as_str(), usage.requested_model.as_deref()),
        (EMBED, Some("all-minilm"))
    );
    assert!(usage.success);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_stream_falls_back_before_its_first_byte_and_never_after() {
    let h = host().await;
    let (small, _, _) = h.stand_in("a", Service::Chat, SMALL).await;
    let (node, _, _) = h.stand_in("b", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    // After the first byte: the first model's node breaks mid-stream; the
    // caller gets the error event, and the next model is never tried.
    small.set(Behavior::CutStream(2));
    let r = h
        .post("/v1/chat/completions", &key, &chat(&[SMALL, MODEL], true))
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("stream_interrupted"), "{text}");
    assert_eq!(node.hits(), 0, "no fallback after the first byte");
    let usage = h.last_usage(&u.id).await;
    assert_eq!(usage.model, SMALL);
    assert_eq!(usage.requested_model, None);
    assert!(!usage.success);

    // Before the first byte: the first model's node is busy.
    small.set(Behavior::Status(503));
    h.clock.advance(std::time::Duration::from_secs(1));
    let r = h
        .post("/v1/chat/completions", &key, &chat(&[SMALL, MODEL], true))
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains(&format!("\"model\":\"{MODEL}\"")), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(node.hits(), 1);
    let usage = h.last_usage(&u.id).await;
    assert_eq!(usage.model, MODEL);
    assert!(usage.success);

    h.assert_ledger().await;
}

#[tokio::test]
async fn the_reservation_covers_the_dearest_model_and_the_charge_is_the_served_ones() {
    let h = host().await;
    let dear = PriceEntry {
        model: Some(SMALL.into()),
        per_request: Credits(1_000_000),
        ..cxmpute_core::testkit::chat_price()
    };
    h.broker.admin().put_price(dear).await.unwrap();
    let (_node, _, _) = h.stand_in("b", Service::Chat, MODEL).await;
    // Enough for a call of MODEL (its bound: 1,000 + the body's bytes + 2 x
    // 4,096 output tokens), not for one of SMALL.
    let (u, key) = h.user(Credits(20_000)).await;

    let r = h
        .post("/v1/chat/completions", &key, &chat(&[MODEL, SMALL], false))
        .await;
    let msg = expect_error(r, 402, "insufficient_credits").await;
    assert!(!msg.is_empty());
    assert_eq!(h.balance(&u.id).await, Credits(20_000));
    let r = h
        .post("/v1/chat/completions", &key, &chat(&[MODEL], false))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.balance(&u.id).await, Credits(20_000 - PLAIN.0));

    // Served by the cheap model although the dear one was asked for first.
    let (rich, rich_key) = h.user(Credits::whole(10)).await;
    let r = h
        .post(
            "/v1/chat/completions",
            &rich_key,
            &chat(&[SMALL, MODEL], false),
        )
        .await;
    assert_eq!(r.status(), 200);
    let usage = h.last_usage(&rich.id).await;
    assert_eq!((usage.model.as_str(), usage.charged), (MODEL, PLAIN));
    assert_eq!(h.balance(&rich.id).await, Credits(10_000_000 - PLAIN.0));
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_call_no_model_can_serve_costs_nothing_and_names_them_all() {
    let h = host().await;
    let (small, _, _) = h.stand_in("a", Service::Chat, SMALL).await;
    small.set(Behavior::Status(500));
    let (u, key) = h.user(Credits::whole(10)).await;

    let r = h
        .post("/v1/chat/completions", &key, &chat(&[SMALL, MODEL], false))
        .await;
    expect_error(r, 502, "upstream_failed").await;
    let r = h
        .post(
            "/v1/chat/completions",
            &key,
            &chat(&["llama3.1:8b", MODEL], false),
        )
        .await;
    let msg = expect_error(r, 503, "no_capacity").await;
    assert!(msg.contains("llama3.1:8b") && msg.contains(MODEL), "{msg}");
    assert_eq!(h.balance(&u.id).await, Credits::whole(10));
    h.assert_ledger().await;
}

#[tokio::test]
async fn bad_model_lists_are_openai_shaped_400s() {
    let h = host().await;
    let (_node, _, _) = h.stand_in("b", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let five = [
        "llama3.2:1b",
        MODEL,
        "llama3.1:8b",
        "qwen2.5:7b",
        "mistral:7b",
    ];
    let cases = [
        (json!({"models": five, "messages": msgs}), "at most 4"),
        (
            json!({"model": "mistral:7b", "models": &five[..4], "messages": msgs}),
            "at most 4",
        ),
        (json!({"models": [], "messages": msgs}), "`model`"),
        (json!({"models": [""], "messages": msgs}), "`models[0]`"),
        (
            json!({"models": [MODEL, " "], "messages": msgs}),
            "`models[1]`",
        ),
        (
            json!({"models": ["no-such", MODEL], "messages": msgs}),
            "no-such",
        ),
        (
            json!({"models": MODEL, "messages": msgs}),
            "invalid request body",
        ),
        (
            json!({"models": [1, 2], "messages": msgs}),
            "invalid request body",
        ),
        (
            json!({"model": 7, "messages": msgs}),
            "invalid request body",
        ),
    ];
    for (body, says) in cases {
        let r = h.post("/v1/chat/completions", &key, &body).await;
        let msg = expect_error(r, 400, "invalid_request").await;
        assert!(msg.contains(says), "{body}: {msg}");
    }
    let r = h
        .post(
            "/v1/embeddings",
            &key,
            &json!({"models": [EMBED, "nope"], "input": "x"}),
        )
        .await;
    expect_error(r, 400, "invalid_request").await;
    // A single unknown model stays OpenAI's 404.
    let r = h
        .post("/v1/chat/completions", &key, &chat(&["no-such"], false))
        .await;
    expect_error(r, 404, "model_not_found").await;
    assert_eq!(h.balance(&u.id).await, Credits::whole(10));
    h.assert_ledger().await;
}

async fn admin(
    h: &TestHost,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .request(method, format!("{}{path}", h.url))
        .bearer_auth(h.admin_key.expose());
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn an_alias_is_served_as_its_models_and_listed_as_an_alias() {
    use reqwest::Method;
    let h = host().await;
    let (node, _, _) = h.stand_in("b", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    let fast = json!({"alias": "fast", "models": [SMALL, MODEL]});
    let r = admin(&h, Method::PUT, "/v1/admin/aliases", Some(fast.clone())).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), fast);
    let r = admin(&h, Method::GET, "/v1/admin/aliases", None).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!([fast]));

    // The OpenAI SDK's shape: `model` names the alias.
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(node.last_body().unwrap()["model"], MODEL);
    let usage = h.last_usage(&u.id).await;
    assert_eq!(
        (usage.model.as_str(), usage.requested_model.as_deref()),
        (MODEL, Some("fast"))
    );
    assert_eq!(usage.charged, PLAIN);

    // Listed, marked as an alias, in a shape OpenAI's model list accepts.
    let list: Value = reqwest::get(format!("{}/v1/models", h.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = (list["data"].as_array().unwrap().iter())
        .find(|m| m["id"] == "fast")
        .expect("the alias is listed")
        .clone();
    assert_eq!(entry["object"], "model");
    assert_eq!(entry["owned_by"], "cxmpute-alias");
    assert_eq!(entry["models"], json!([SMALL, MODEL]));
    assert_eq!(entry["service"], "chat");
    assert_eq!(entry["nodes"], 1);
    let model = (list["data"].as_array().unwrap().iter())
        .find(|m| m["id"] == MODEL)
        .unwrap();
    assert!(model.get("models").is_none());
    let catalogue: Value = reqwest::get(format!("{}/v1/catalogue", h.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(catalogue["aliases"], json!([fast]));

    // Refused: shadowing a model, naming an alias, a model twice, none, five.
    let refused = [
        json!({"alias": MODEL, "models": [SMALL]}),
        json!({"alias": "quick", "models": ["fast"]}),
        json!({"alias": "quick", "models": [MODEL, MODEL]}),
        json!({"alias": "quick", "models": []}),
        json!({"alias": "quick", "models": ["a", "b", "c", "d", "e"]}),
        json!({"alias": " quick", "models": [MODEL]}),
        json!({"alias": "quick", "models": [MODEL], "extra": 1}),
    ];
    for body in refused {
        let r = admin(&h, Method::PUT, "/v1/admin/aliases", Some(body.clone())).await;
        assert_eq!(r.status(), 400, "{body}");
    }
    // A catalogue entry may not take an alias's name either.
    let entry = json!({"service": "chat", "model": "fast", "min_tier": 1, "target_nodes": 0});
    let r = admin(&h, Method::PUT, "/v1/admin/catalogue", Some(entry)).await;
    assert_eq!(r.status(), 409);
    // An alias and more names than the bound once resolved.
    let many = json!({"models": ["fast", "llama3.1:8b", "qwen2.5:7b", "mistral:7b"],
        "messages": [{"role": "user", "content": "hi"}]});
    let r = h.post("/v1/chat/completions", &key, &many).await;
    let msg = expect_error(r, 400, "invalid_request").await;
    assert!(msg.contains("at most 4"), "{msg}");

    // An alias may name a model the catalogue does not (or no longer)
    // offer: it is skipped like a model with no node.
    let gone = json!({"alias": "steady", "models": ["retired:1b", MODEL]});
    let r = admin(&h, Method::PUT, "/v1/admin/aliases", Some(gone)).await;
    assert_eq!(r.status(), 200);
    let steady = json!({"model": "steady", "messages": [{"role": "user", "content": "hi"}]});
    let r = h.post("/v1/chat/completions", &key, &steady).await;
    assert_eq!(r.status(), 200);

    let r = admin(&h, Method::DELETE, "/v1/admin/aliases/fast", None).await;
    assert_eq!(r.status(), 204);
    let r = admin(&h, Method::DELETE, "/v1/admin/aliases/fast", None).await;
    assert_eq!(r.status(), 404);
    let r = h.post("/v1/chat/completions", &key, &body).await;
    expect_error(r, 404, "model_not_found").await;
    h.assert_ledger().await;
}

#[tokio::test]
async fn the_next_model_serves_when_the_first_models_node_hangs_or_breaks_its_answer() {
    let h = host().await;
    let (small, small_p, _) = h.stand_in("a", Service::Chat, SMALL).await;
    let (node, _, _) = h.stand_in("b", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(10)).await;

    // Half an answer, then the connection closes: nothing reached the caller.
    small.set(Behavior::CutStream(0));
    let r = h
        .post("/v1/chat/completions", &key, &chat(&[SMALL, MODEL], false))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], MODEL);
    assert_eq!((small.hits(), node.hits()), (1, 1));

    // No answer at all: the first phase times out (the test host's
    // first-byte timeout), then the next model serves the stream.
    small.set(Behavior::Hang);
    h.clock.advance(std::time::Duration::from_secs(1));
    let r = h
        .post("/v1/chat/completions", &key, &chat(&[SMALL, MODEL], true))
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!((small.hits(), node.hits()), (2, 2));
    let usage = h.last_usage(&u.id).await;
    assert_eq!(
        (usage.model.as_str(), usage.requested_model.as_deref()),
        (MODEL, Some(SMALL))
    );
    assert_eq!(usage.charged, PLAIN);
    assert_eq!(h.earnings(&small_p.id).await, Credits::ZERO);
    // Both calls moved on once, and operators can see it.
    let metrics = reqwest::get(format!("{}/metrics", h.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = (metrics.lines())
        .find(|l| l.starts_with("cxmpute_fallbacks_total{"))
        .expect("the fallback counter");
    assert!(line.contains("route=\"/v1/chat/completions\""), "{line}");
    assert!(line.ends_with(" 2"), "{line}");
    h.assert_ledger().await;
}
