//! The provider network end to end: node lifecycle over HTTP, expiry, health
//! probes and the circuit breaker driven by a manual clock, the default
//! selector end to end, and reward policies to the micro-credit (the
//! selectors over the routing index are unit tests of `select`).

use std::sync::Arc;
use std::time::Duration;

use crate::common::{listed, ProviderApi};
use cxmpute_core::health::{BreakerState, HealthConfig};
use cxmpute_core::pricing::Meter;
use cxmpute_core::reward::RewardContext;
use cxmpute_core::testkit::{
    chat_price, expect_error, test_config, Behavior, StandInNode, TestHost, MODEL,
};
use cxmpute_core::*;
use serde_json::{json, Value};

// ---- helpers -------------------------------------------------------------------

async fn host_with(f: impl FnOnce(BrokerBuilder) -> BrokerBuilder) -> TestHost {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let h = TestHost::start_with(store, f).await;
    h.broker.admin().put_price(chat_price()).await.unwrap();
    h
}

/// The status of a chat call to `model` with `key`.
async fn chat_status(h: &TestHost, key: &Secret, model: &str) -> reqwest::StatusCode {
    h.post("/v1/chat/completions", key, &chat(model))
        .await
        .status()
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

fn breaker(h: &TestHost, id: &ProvisionId) -> BreakerState {
    (h.broker.network())
        .node_status(id)
        .expect("node in the index")
        .breaker
}

// ---- lifecycle -----------------------------------------------------------------

#[tokio::test]
async fn lifecycle_register_start_ready_heartbeat_end_delete_over_http() {
    let h = host_with(|b| b).await;
    let (_, key_a) = h.provider().await;
    let (_, key_b) = h.provider().await;
    let a = ProviderApi::new(&h, &key_a);
    let b = ProviderApi::new(&h, &key_b);
    let node = StandInNode::start("n").await;
    let (_, user) = h.user(Credits::whole(10)).await;

    // Register: typed diagnostics, lenient (camelCase, aliases, unknown fields).
    let reg = json!({
        "device": {"os": "Ubuntu 24.04", "gpu": {"name": "RTX 3080", "memoryMb": 10240, "cuda": true, "pcie": 4},
                   "cpu": {"name": "Ryzen", "cores": 8, "threads": 16, "arch": "x86_64"},
                   "ram": {"totalMb": 32768, "freeMb": 20000}, "storage": {"total_mb": 1000000}, "battery": null},
        "location": {"country": "DE", "state": "BE", "city": "Berlin"}
    });
    let r = a.post("", Some(reg)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["state"].as_str(), v["tier"].as_u64()),
        (Some("registered"), Some(3))
    );
    let id = v["provision_id"].as_str().unwrap().to_owned();
    node.require_secret(v["node_secret"].as_str().unwrap());

    // Another provider cannot see or manage it: 404, as if it did not exist.
    let path = format!("/{id}");
    let ready_body =
        json!({"endpoint": node.url(), "services": [{"service": "chat", "model": MODEL}]});
    expect_error(b.get(&path).await, 404, "not_found").await;
    expect_error(
        b.post(&format!("{path}/start"), None).await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        b.post(&format!("{path}/ready"), Some(ready_body.clone()))
            .await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        b.post(&format!("{path}/heartbeat"), None).await,
        404,
        "not_found",
    )
    .await;
    expect_error(b.post(&format!("{path}/end"), None).await, 404, "not_found").await;
    expect_error(b.delete(&path).await, 404, "not_found").await;
    let r = reqwest::Client::new()
        .post(format!("{}{path}/start", a.base))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    // Start: the broker assigns what a tier 3 node can hold, from the catalogue.
    let r = a
        .post(
            &format!("{path}/start"),
            Some(json!({"services": ["chat"]})),
        )
        .await;
    assert_eq!(r.status(), 200);
    let start: Value = r.json().await.unwrap();
    assert_eq!(start["state"], "starting");
    let assigned = start["services"].as_array().unwrap();
    assert_eq!(assigned.len(), 4, "tier 3 nodes get four models: {start}");
    let catalogue = network::Catalogue::original();
    for s in assigned {
        assert_eq!(s["service"], "chat");
        assert!(
            catalogue.allows(Service::Chat, s["model"].as_str().unwrap(), 3),
            "{s}"
        );
    }
    let r = a.post(&format!("{path}/start"), None).await;
    assert_eq!(r.status(), 200, "the body is optional");
    let first = assigned[0]["model"].as_str().unwrap().to_owned();

    // Ready: an assigned model, and one the tier allows that was not assigned.
    let ready = json!({"endpoint": format!("{}/", node.url()), "services": [
        {"service": "chat", "model": first}, {"service": "embeddings", "model": "nomic-embed-text"}]});
    let r = a.post(&format!("{path}/ready"), Some(ready.clone())).await;
    assert_eq!(r.status(), 200);
    let view: Value = r.json().await.unwrap();
    assert_eq!(
        (view["state"].as_str(), view["healthy"].as_bool()),
        (Some("ready"), Some(true))
    );
    assert_eq!(view["services"].as_array().unwrap().len(), 2);
    assert_eq!(
        view["endpoint"].as_str(),
        Some(node.url().as_str()),
        "normalised"
    );

    // It serves both pools, with the node secret.
    assert_eq!(chat_status(&h, &user, &first).await, 200);
    let emb = json!({"model": "nomic-embed-text", "input": "hello"});
    assert_eq!(h.post("/v1/embeddings", &user, &emb).await.status(), 200);
    assert_eq!(node.hits(), 2);

    let list: Value = a.get("").await.json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["location"]["city"], "Berlin");
    let one: Value = a.get(&path).await.json().await.unwrap();
    assert_eq!(one["provision_id"].as_str(), Some(id.as_str()));
    assert_eq!(
        a.post(&format!("{path}/heartbeat"), None).await.status(),
        204
    );

    // End: it leaves every pool at once; heartbeats are refused until it is ready again.
    assert_eq!(a.post(&format!("{path}/end"), None).await.status(), 204);
    assert!(h.broker.models().data.is_empty());
    expect_error(
        h.post("/v1/chat/completions", &user, &chat(&first)).await,
        404,
        "model_not_found",
    )
    .await;
    expect_error(
        a.post(&format!("{path}/heartbeat"), None).await,
        409,
        "conflict",
    )
    .await;
    let ended: Value = a.get(&path).await.json().await.unwrap();
    assert_eq!(ended["state"], "ended");
    assert_eq!(
        a.post(&format!("{path}/ready"), Some(ready)).await.status(),
        200
    );
    assert_eq!(chat_status(&h, &user, &first).await, 200);

    // Delete: gone from every pool and from the store.
    assert_eq!(a.delete(&path).await.status(), 204);
    assert!(h.broker.models().data.is_empty());
    expect_error(a.get(&path).await, 404, "not_found").await;
    expect_error(
        a.post(&format!("{path}/heartbeat"), None).await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn lifecycle_refuses_bad_input_with_clear_errors() {
    let h = host_with(|b| b).await;
    let (_, key) = h.provider().await;
    let a = ProviderApi::new(&h, &key);
    let node = StandInNode::start("n").await;
    // Tier 1 (2 GB): the 8B model needs tier 2.
    let small = json!({"device": {"gpu": {"memory_mb": 2048}}});
    let v: Value = a.post("", Some(small)).await.json().await.unwrap();
    assert_eq!(v["tier"], 1);
    let path = format!("/{}", v["provision_id"].as_str().unwrap());
    let ready = |model: &str| json!({"endpoint": node.url(), "services": [{"service": "chat", "model": model}]});
    let m = expect_error(
        a.post(&format!("{path}/ready"), Some(ready("llama3.1:8b")))
            .await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.contains("needs a tier 2 node"), "{m}");
    let m = expect_error(
        a.post(&format!("{path}/ready"), Some(ready("gpt-4o")))
            .await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.contains("not in the catalogue"), "{m}");
    let none = json!({"endpoint": node.url(), "services": []});
    expect_error(
        a.post(&format!("{path}/ready"), Some(none)).await,
        400,
        "invalid_request",
    )
    .await;
    let no_endpoint = json!({"services": [{"service": "chat", "model": "llama3.2:1b"}]});
    expect_error(
        a.post(&format!("{path}/ready"), Some(no_endpoint)).await,
        400,
        "invalid_request",
    )
    .await;
    let ftp = json!({"endpoint": "ftp://example.com", "services": [{"service": "chat", "model": "llama3.2:1b"}]});
    expect_error(
        a.post(&format!("{path}/ready"), Some(ftp)).await,
        400,
        "invalid_request",
    )
    .await;
    let bad_service = json!({"services": ["teleport"]});
    expect_error(
        a.post(&format!("{path}/start"), Some(bad_service)).await,
        400,
        "invalid_request",
    )
    .await;
    let only_vision = json!({"services": ["vision"]});
    let m = expect_error(
        a.post(&format!("{path}/start"), Some(only_vision)).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.contains("tier 1"), "{m}");
    // What a tier 1 node is given by default: two models it can hold.
    let start: Value = a
        .post(&format!("{path}/start"), None)
        .await
        .json()
        .await
        .unwrap();
    let assigned = start["services"].as_array().unwrap();
    assert_eq!(assigned.len(), 2);
    let catalogue = network::Catalogue::original();
    for s in assigned {
        let service: Service = serde_json::from_value(s["service"].clone()).unwrap();
        assert!(
            catalogue.allows(service, s["model"].as_str().unwrap(), 1),
            "{s}"
        );
    }
    // The operating system as an object works as well as a name.
    let detailed = json!({"device": {"os": {"family": "linux", "name": "Debian 12", "kernel": "6.1"},
        "gpu": {"name": "RTX 4090", "memory_mb": 24564, "count": 2, "integrated": false, "driver": "550"}}});
    let v: Value = a.post("", Some(detailed)).await.json().await.unwrap();
    assert_eq!(v["tier"], 4);
    // Diagnostics of the wrong type.
    let bad_device = json!({"device": {"gpu": {"memory_mb": "lots"}}});
    let m = expect_error(a.post("", Some(bad_device)).await, 400, "invalid_request").await;
    assert!(m.contains("device diagnostics"), "{m}");
    expect_error(a.post("/nope/start", None).await, 404, "not_found").await;
}

#[tokio::test]
async fn node_endpoints_pass_the_egress_guard_unless_private_addresses_are_allowed() {
    // The production default: public addresses only.
    let h = host_with(|b| b.config(BrokerConfig::default())).await;
    let (_, key) = h.provider().await;
    let a = ProviderApi::new(&h, &key);
    let v: Value = a.post("", Some(json!({}))).await.json().await.unwrap();
    let path = format!("/{}", v["provision_id"].as_str().unwrap());
    for endpoint in [
        "http://127.0.0.1:8080",
        "http://10.0.0.7",
        "http://169.254.169.254",
        "http://[::1]:9",
    ] {
        let ready = json!({"endpoint": endpoint, "services": [{"service": "chat", "model": "llama3.2:1b"}]});
        expect_error(
            a.post(&format!("{path}/ready"), Some(ready)).await,
            403,
            "forbidden",
        )
        .await;
    }
    let reg = json!({"endpoint": "http://192.168.1.2", "services": [{"service": "chat", "model": "llama3.2:1b"}]});
    expect_error(a.post("", Some(reg)).await, 403, "forbidden").await;
    assert!(h.broker.models().data.is_empty());
}

// ---- hostile providers ---------------------------------------------------------

/// `n` chat services named `{prefix}-0`, `{prefix}-1`...
fn services(prefix: &str, n: usize) -> Value {
    (0..n)
        .map(|i| json!({"service": "chat", "model": format!("{prefix}-{i}")}))
        .collect()
}

#[tokio::test]
async fn a_node_may_serve_at_most_the_cap_of_models_on_every_path() {
    let h = host_with(|b| b).await;
    let (p, key) = h.provider().await;
    let a = ProviderApi::new(&h, &key);
    let node = StandInNode::start("n").await;
    let (_, user) = h.user(Credits::whole(1)).await;

    // The operator offers 64 models, m-0 to m-63.
    for i in 0..64 {
        h.offer(Service::Chat, &format!("m-{i}")).await;
    }
    // One over the cap: refused before anything is stored or routed.
    let reg = |n: usize| json!({"endpoint": node.url(), "services": services("m", n)});
    let m = expect_error(a.post("", Some(reg(65))).await, 400, "invalid_request").await;
    assert!(m.contains("65") && m.contains("at most 64"), "{m}");
    // The reported flood (80,000 pairs, 3.3 MB): refused the same way, at once.
    let m = expect_error(a.post("", Some(reg(80_000))).await, 400, "invalid_request").await;
    assert!(m.contains("at most 64"), "{m}");
    assert_eq!(listed(&a).await, 0);
    assert!(h.broker.models().data.is_empty());

    // At the cap: accepted and served.
    let r = a.post("", Some(reg(64))).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    node.require_secret(v["node_secret"].as_str().unwrap());
    assert_eq!(h.broker.models().data.len(), 64);
    assert_eq!(chat_status(&h, &user, "m-63").await, 200);

    // Reporting ready is held to the same cap.
    let id = h.add_node(&p, &node, Service::Chat, "llama3.2:1b").await;
    let ready = json!({"endpoint": node.url(), "services": services("llama3.2:1b", 65)});
    let m = expect_error(
        a.post(&format!("/{id}/ready"), Some(ready)).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.contains("at most 64"), "{m}");
    h.assert_ledger().await;

    // The cap is the operator's: a smaller one applies to both paths alike.
    let mut cfg = test_config();
    cfg.network.max_services_per_node = 2;
    let h = host_with(|b| b.config(cfg)).await;
    let (_, key) = h.provider().await;
    let a = ProviderApi::new(&h, &key);
    let m = expect_error(a.post("", Some(reg(3))).await, 400, "invalid_request").await;
    assert!(m.contains("at most 2"), "{m}");
    let v: Value = a.post("", Some(json!({}))).await.json().await.unwrap();
    let path = format!("/{}/ready", v["provision_id"].as_str().unwrap());
    let ready = json!({"endpoint": node.url(), "services": [
        {"service": "chat", "model": "llama3.2:1b"},
        {"service": "chat", "model": "llama3.2:3b"},
        {"service": "embeddings", "model": "all-minilm"}]});
    let m = expect_error(a.post(&path, Some(ready)).await, 400, "invalid_request").await;
    assert!(m.contains("at most 2"), "{m}");
}

#[tokio::test]
async fn what_a_stranger_writes_into_a_registration_is_bounded() {
    let h = host_with(|b| b).await;
    let (_, key) = h.provider().await;
    let a = ProviderApi::new(&h, &key);

    // Location fields: short text, no control characters.
    let long = "x".repeat(101);
    for location in [
        json!({"country": long}),
        json!({"state": long}),
        json!({"city": long}),
        json!({"city": "Ber\u{0}lin"}),
    ] {
        let m = expect_error(
            a.post("", Some(json!({"location": location}))).await,
            400,
            "invalid_request",
        )
        .await;
        assert!(m.contains("location"), "{m}");
    }
    let ok = json!({"location": {"country": "DE", "state": "BE", "city": "x".repeat(100)}});
    assert_eq!(a.post("", Some(ok)).await.status(), 200);
    assert_eq!(listed(&a).await, 1);

    // Device diagnostics are capped.
    let big = json!({"device": {"os": "y".repeat(70_000)}});
    let m = expect_error(a.post("", Some(big)).await, 400, "invalid_request").await;
    assert!(m.contains("device diagnostics"), "{m}");

    // Asking to start with a long list of services is answered with a short
    // message, not the list echoed back.
    let v: Value = a
        .post("", Some(json!({"device": {"gpu": {"memory_mb": 2048}}})))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/{}/start", v["provision_id"].as_str().unwrap());
    let wanted = vec!["vision"; 200_000];
    let m = expect_error(
        a.post(&path, Some(json!({"services": wanted}))).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.len() < 200, "{} bytes: {}", m.len(), &m[..200]);
}

// ---- expiry and health ---------------------------------------------------------

#[tokio::test]
async fn a_node_that_stops_heartbeating_leaves_routing_after_the_ttl_and_returns_when_ready() {
    let mut cfg = test_config();
    cfg.heartbeat_ttl = Duration::from_secs(30);
    let h = host_with(|b| b.config(cfg)).await;
    let node = StandInNode::start("n").await;
    let (p, key) = h.provider().await;
    let id = h.add_node(&p, &node, Service::Chat, MODEL).await;
    let a = ProviderApi::new(&h, &key);
    let (_, user) = h.user(Credits::whole(1)).await;

    h.clock.advance(Duration::from_secs(20));
    assert_eq!(
        a.post(&format!("/{id}/heartbeat"), None).await.status(),
        204
    );
    // Exactly the TTL since the last heartbeat: still in.
    h.clock.advance(Duration::from_secs(30));
    h.broker.run_maintenance().await.unwrap();
    assert!(h.is_routable(&id));
    assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    // One millisecond more: out, and ended in the store.
    h.clock.advance(Duration::from_millis(1));
    h.broker.run_maintenance().await.unwrap();
    assert!(!h.is_routable(&id));
    assert!(h.broker.models().data.is_empty());
    assert_eq!(
        h.broker.store().provision(&id).await.unwrap().state,
        ProvisionState::Ended
    );
    expect_error(
        h.post("/v1/chat/completions", &user, &chat(MODEL)).await,
        404,
        "model_not_found",
    )
    .await;
    expect_error(
        a.post(&format!("/{id}/heartbeat"), None).await,
        409,
        "conflict",
    )
    .await;
    // It comes back by reporting ready again, and stays while it heartbeats.
    let ready = json!({"endpoint": node.url(), "services": [{"service": "chat", "model": MODEL}]});
    assert_eq!(
        a.post(&format!("/{id}/ready"), Some(ready)).await.status(),
        200
    );
    h.clock.advance(Duration::from_secs(25));
    assert_eq!(
        a.post(&format!("/{id}/heartbeat"), None).await.status(),
        204
    );
    h.clock.advance(Duration::from_secs(25));
    h.broker.run_maintenance().await.unwrap();
    assert!(h.is_routable(&id));
    assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    assert_eq!(node.hits(), 2);
}

fn health_config() -> HealthConfig {
    let mut c = HealthConfig::default();
    c.probe_failures_to_eject = 2;
    c.probe_timeout = Duration::from_secs(2);
    c.min_samples = 3;
    c.failure_rate_permille = 500;
    c.cooldown = Duration::from_secs(10);
    c.half_open_successes = 2;
    c
}

#[tokio::test]
async fn a_node_failing_probes_leaves_after_the_configured_rounds_and_returns_on_trial() {
    let h = host_with(|b| {
        b.health(health_config())
            .selector(Arc::new(RoundRobinSelector))
    })
    .await;
    let good = StandInNode::start("good").await;
    let flaky = StandInNode::start("flaky").await;
    let (p, _) = h.provider().await;
    h.add_node(&p, &good, Service::Chat, MODEL).await;
    let id = h.add_node(&p, &flaky, Service::Chat, MODEL).await;
    let (_, user) = h.user(Credits::whole(1)).await;

    let r = h.broker.run_health_checks().await;
    assert_eq!((r.probed, r.failed), (2, 0));
    flaky.set_heartbeat(Behavior::Status(500));
    let r = h.broker.run_health_checks().await;
    assert!(r.ejected.is_empty(), "one failed probe is not enough");
    assert!(h.is_routable(&id));
    let r = h.broker.run_health_checks().await;
    assert_eq!(r.ejected, vec![id.clone()], "two in a row take it out");
    assert_eq!(breaker(&h, &id), BreakerState::Open);
    for _ in 0..4 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert_eq!(flaky.hits(), 0, "no traffic while out");

    // Healthy again, but not before the cooldown: it is not even probed.
    flaky.set_heartbeat(Behavior::Ok);
    h.clock.advance(Duration::from_secs(9));
    let r = h.broker.run_health_checks().await;
    assert_eq!((r.probed, r.restored.len()), (1, 0));
    h.clock.advance(Duration::from_secs(1));
    let r = h.broker.run_health_checks().await;
    assert_eq!(r.restored, vec![id.clone()]);
    assert_eq!(breaker(&h, &id), BreakerState::HalfOpen);
    // On trial: two forwarded successes close it.
    for _ in 0..6 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert_eq!(flaky.hits(), 3, "round robin over two nodes");
    assert_eq!(breaker(&h, &id), BreakerState::Closed);

    // A busy answer with Retry-After takes it out in one round, for that long.
    flaky.set_heartbeat(Behavior::StatusRetryAfter(503, 30));
    let r = h.broker.run_health_checks().await;
    assert_eq!(r.ejected, vec![id.clone()]);
    flaky.set_heartbeat(Behavior::Ok);
    h.clock.advance(Duration::from_secs(29));
    assert!(h.broker.run_health_checks().await.restored.is_empty());
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(
        h.broker.run_health_checks().await.restored,
        vec![id.clone()]
    );
}

#[tokio::test]
async fn a_node_failing_while_forwarding_leaves_at_the_failure_rate_and_returns_when_healthy() {
    let h = host_with(|b| {
        b.health(health_config())
            .selector(Arc::new(RoundRobinSelector))
    })
    .await;
    let good = StandInNode::start("good").await;
    let bad = StandInNode::start("bad").await;
    bad.set(Behavior::Status(500));
    let (p, _) = h.provider().await;
    h.add_node(&p, &good, Service::Chat, MODEL).await;
    let id = h.add_node(&p, &bad, Service::Chat, MODEL).await;
    let (_, user) = h.user(Credits::whole(1)).await;

    // Every call succeeds (failover); the bad node is out after its third
    // failure, the minimum sample, with no health check on the request path.
    for _ in 0..20 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
        if !h.is_routable(&id) {
            break;
        }
    }
    assert!(!h.is_routable(&id));
    assert_eq!(bad.hits(), 3);
    for _ in 0..5 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert_eq!(bad.hits(), 3, "no traffic while out");

    bad.set(Behavior::Ok);
    assert!(
        h.broker.run_health_checks().await.restored.is_empty(),
        "cooldown first"
    );
    h.clock.advance(Duration::from_secs(10));
    assert_eq!(
        h.broker.run_health_checks().await.restored,
        vec![id.clone()]
    );
    for _ in 0..4 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert_eq!(bad.hits(), 5);
    assert_eq!(breaker(&h, &id), BreakerState::Closed);

    // Failing again on trial would reopen it at once, for twice as long; a
    // closed breaker starts again from the first cooldown.
    bad.set(Behavior::Status(500));
    for _ in 0..20 {
        h.post("/v1/chat/completions", &user, &chat(MODEL)).await;
        if !h.is_routable(&id) {
            break;
        }
    }
    let stats = h.broker.network().node_status(&id).unwrap();
    assert_eq!(
        stats.breaker_open_until,
        h.clock.now().plus(Duration::from_secs(10))
    );
}

#[tokio::test]
async fn a_node_answering_429_with_retry_after_is_out_for_that_long() {
    let h = host_with(|b| {
        b.health(health_config())
            .selector(Arc::new(RoundRobinSelector))
    })
    .await;
    let good = StandInNode::start("good").await;
    let busy = StandInNode::start("busy").await;
    busy.set(Behavior::StatusRetryAfter(429, 20));
    let (p, _) = h.provider().await;
    h.add_node(&p, &good, Service::Chat, MODEL).await;
    let id = h.add_node(&p, &busy, Service::Chat, MODEL).await;
    let (_, user) = h.user(Credits::whole(1)).await;
    for _ in 0..2 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert_eq!(busy.hits(), 1);
    assert!(!h.is_routable(&id), "out on the first busy answer");
    let until = h
        .broker
        .network()
        .node_status(&id)
        .unwrap()
        .breaker_open_until;
    assert_eq!(until, h.clock.now().plus(Duration::from_secs(20)));
    busy.set(Behavior::Ok);
    h.clock.advance(Duration::from_secs(19));
    assert!(h.broker.run_health_checks().await.restored.is_empty());
    h.clock.advance(Duration::from_secs(1));
    assert_eq!(
        h.broker.run_health_checks().await.restored,
        vec![id.clone()]
    );
    for _ in 0..2 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert_eq!(busy.hits(), 2);
}

// ---- selectors -----------------------------------------------------------------

#[tokio::test]
async fn the_default_selector_avoids_a_slow_node_end_to_end() {
    let h = host_with(|b| b).await;
    let slow = StandInNode::start("slow").await;
    slow.set(Behavior::Slow(Duration::from_millis(300)));
    let fast1 = StandInNode::start("fast1").await;
    let fast2 = StandInNode::start("fast2").await;
    let (p, _) = h.provider().await;
    for n in [&slow, &fast1, &fast2] {
        h.add_node(&p, n, Service::Chat, MODEL).await;
    }
    let (_, user) = h.user(Credits::whole(10)).await;
    for _ in 0..40 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert!(slow.hits() <= 3, "slow node got {} of 40", slow.hits());
    // A call to the slow node is hedged on a fast one, so a call may reach two nodes.
    let hits = slow.hits() + fast1.hits() + fast2.hits();
    assert!((40..=40 + slow.hits()).contains(&hits), "{hits} hits");
}

// ---- rewards -------------------------------------------------------------------

fn ctx(
    service: Service,
    model: &str,
    tier: u8,
    tokens: (u64, u64),
    latency_ms: u64,
) -> RewardContext<'_> {
    RewardContext {
        service,
        model,
        tier,
        meter: Meter {
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            units: 0,
        },
        latency_ms,
        charged: Credits::whole(1),
        verification_permille: 1000,
    }
}

#[test]
fn tiered_rewards_are_the_original_formula_to_the_micro_credit() {
    use Service::*;
    // (service, model, tier, (input, output) tokens, latency ms, reward in micro-credits, why)
    #[rustfmt::skip]
    let cases = [
        (Chat, "llama3.2:1b", 1, (10, 5), 500, 5_665, "tier 1 chat, 1B (x1.0), 15 tokens, fast: (5,000 + 15 x 10) x 1.1"),
        (Chat, "llama3.2:3b", 2, (60, 40), 1_999, 23_100, "tier 2 chat, 3B (x1.2), 100 tokens, fast: (15,000 x 1.2 + 100 x 30) x 1.1"),
        (Chat, "llama3.1:8b", 3, (1_000, 234), 2_000, 138_880, "tier 3 chat, 8B (x1.5), 1,234 tokens, exactly 2 s (no bonus): 52,500 + 86,380"),
        (Embeddings, "nomic-embed-text", 4, (1_000, 99), 5_000, 67_500, "tier 4 embeddings (x0.3), 1,000 input tokens (output ignored): 22,500 + 45,000"),
        (Tts, "kokoro", 3, (500, 500), 10_001, 18_900, "tier 3 tts (x0.6), slow (x0.9), tokens not paid: 35,000 x 0.6 x 0.9"),
        (Tts, "kokoro", 3, (0, 0), 10_000, 21_000, "exactly 10 s is not slow"),
        (Scrape, "default", 3, (0, 0), 3_000, 7_000, "tier 3 scrape (x0.2)"),
        (Vision, "moondream", 2, (0, 0), 1_000, 8_250, "tier 2 vision (others, x0.5), fast"),
        (Embeddings, "all-minilm", 1, (5, 0), 100, 1_667, "one rounding, half up: (1,500 + 5 x 3) x 1.1 = 1,666.5"),
        (Embeddings, "all-minilm", 1, (1, 0), 100, 1_653, "(1,500 + 1 x 3) x 1.1 = 1,653.3"),
        (Chat, "qwen2.5:14b", 1, (0, 0), 5_000, 10_000, "size from the tag: 14B x2.0"),
        (Chat, "llama3.1:70b", 1, (0, 0), 5_000, 12_500, "size from the tag: 70B x2.5"),
        (Chat, "qwen2.5:0.5b", 1, (0, 0), 5_000, 5_000, "size from the tag: 0.5B x1.0"),
        (Chat, "llama3.2:1b", 0, (0, 0), 5_000, 5_000, "tiers below 1 are paid as tier 1"),
        (Chat, "llama3.2:1b", 9, (0, 0), 5_000, 75_000, "tiers above 4 are paid as tier 4"),
    ];
    let p = TieredReward::default();
    for (service, model, tier, tokens, latency_ms, reward, why) in cases {
        let got = p.reward(&ctx(service, model, tier, tokens, latency_ms));
        assert_eq!(got.as_micros(), reward, "{why}");
    }
    // A complexity override wins over the size in the tag.
    let custom = TieredReward::default().with_complexity("llama3.2:1b", 3_000);
    assert_eq!(
        custom.reward(&ctx(Chat, "llama3.2:1b", 1, (0, 0), 5_000)),
        Credits(15_000)
    );
}

#[test]
fn platform_share_and_flat_rewards_are_exact() {
    let c = |charged: i64| RewardContext {
        charged: Credits(charged),
        ..ctx(Service::Chat, MODEL, 1, (0, 0), 0)
    };
    // The platform keeps 30 %: the provider earns 70 %, rounded down.
    let seventy = PlatformShare::new(300).unwrap();
    assert_eq!(
        seventy.reward(&c(1_234_567)),
        Credits(864_196),
        "rounded down"
    );
    assert_eq!(seventy.reward(&c(0)), Credits::ZERO);
    assert_eq!(
        PlatformShare::new(0).unwrap().reward(&c(1_020)),
        Credits(1_020)
    );
    assert_eq!(
        PlatformShare::new(1_000).unwrap().reward(&c(1_020)),
        Credits::ZERO
    );
    assert!(PlatformShare::new(1_001).is_err());
    assert_eq!(FlatReward::default().reward(&c(5)), Credits(10_000));
}

#[tokio::test]
async fn providers_earn_what_the_policy_says_from_settled_successful_requests_only() {
    // The platform keeps 30 %: the provider earns 70 % of the 1,020 charged.
    let h = host_with(|b| b.reward_policy(Arc::new(PlatformShare::new(300).unwrap()))).await;
    let (_node, p, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (failing, pf, _) = h.stand_in("f", Service::Chat, MODEL).await;
    failing.set(Behavior::Status(500));
    let (_, user) = h.user(Credits::whole(1)).await;
    for _ in 0..3 {
        assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    }
    assert_eq!(h.earnings(&p.id).await, Credits(3 * 714));
    assert_eq!(
        h.earnings(&pf.id).await,
        Credits::ZERO,
        "failures earn nothing"
    );

    // Tiered: a tier 3 node serving a 3B model, by the request's own latency.
    let h = host_with(|b| b.reward_policy(Arc::new(TieredReward::default()))).await;
    h.broker
        .admin()
        .put_price(PriceEntry {
            per_request: Credits::whole(1),
            ..chat_price()
        })
        .await
        .unwrap();
    let (_node, p, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (u, user) = h.user(Credits::whole(10)).await;
    assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    let usage = h.last_usage(&u.id).await;
    // (35,000 × 1.2 + 15 tokens × 70) × latency factor.
    let factor = TieredReward::latency_permille(usage.latency_ms) as i64;
    let expected = (42_000 + 1_050) * factor / 1_000;
    assert_eq!(usage.reward, Credits(expected));
    assert_eq!(h.earnings(&p.id).await, Credits(expected));

    // A reward above the charge is clamped to it: the platform never pays out more.
    let h = host_with(|b| b.reward_policy(Arc::new(FlatReward(Credits(5_000))))).await;
    let (_node, p, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (_, user) = h.user(Credits::whole(1)).await;
    assert_eq!(chat_status(&h, &user, MODEL).await, 200);
    assert_eq!(h.earnings(&p.id).await, Credits(1_020));
}
