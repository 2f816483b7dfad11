//! The catalogue as data and the platform's share, end to end over HTTP: a
//! model added at run time is served, one removed is not; changes are
//! validated; the one-step registration obeys the catalogue and the tiers;
//! the default reward policy leaves the platform its share, exactly; a
//! configuration file seeds the catalogue, prices and the policy.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::common::{call, ProviderApi};
use cxmpute_core::config;
use cxmpute_core::network::{Catalogue, CatalogueModel};
use cxmpute_core::testkit::{
    chat_price, expect_error, test_config, StandInNode, TestHost, EMBED, MODEL,
};
use cxmpute_core::wire::{CatalogueChange, CatalogueList, RewardPolicyView};
use cxmpute_core::*;
use serde_json::{json, Value};

/// A host on a fresh memory store charging [`chat_price`], with the
/// default reward policy (the platform's share).
async fn host() -> TestHost {
    let h = TestHost::start(Arc::new(MemoryStore::new())).await;
    h.broker.admin().put_price(chat_price()).await.unwrap();
    h
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

async fn put(h: &TestHost, body: Value) -> reqwest::Response {
    call(h, "PUT", "/v1/admin/catalogue")
        .bearer(h.admin_key.expose())
        .json(body)
        .send()
        .await
}

async fn delete(h: &TestHost, service: &str, model: &str) -> reqwest::Response {
    call(
        h,
        "DELETE",
        format!("/v1/admin/catalogue/{service}/{model}"),
    )
    .bearer(h.admin_key.expose())
    .send()
    .await
}

async fn admin_catalogue(h: &TestHost) -> Vec<CatalogueModel> {
    call(h, "GET", "/v1/admin/catalogue")
        .bearer(h.admin_key.expose())
        .ok()
        .await
}

/// The public catalogue, asked with no credential.
async fn offers(h: &TestHost) -> CatalogueList {
    call(h, "GET", "/v1/catalogue").ok().await
}

#[tokio::test]
async fn a_model_added_at_run_time_is_served_and_one_removed_is_not() {
    let h = host().await;
    let (_, user) = h.user(Credits::whole(10)).await;
    let (p, pkey) = h.provider().await;
    let node = StandInNode::start("katan").await;
    let api = ProviderApi::new(&h, &pkey);
    let reg =
        json!({"endpoint": node.url(), "services": [{"service": "chat", "model": "katan-echo"}]});

    // Not in the built-in catalogue: refused, nothing stored.
    let m = expect_error(
        api.post("", Some(reg.clone())).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.contains("`katan-echo` is not in the catalogue"), "{m}");
    assert_eq!(admin_catalogue(&h).await, Catalogue::original().models());
    let builtin = Catalogue::original().models().len();

    // Added through the admin API: the built-in models stay.
    let r = put(
        &h,
        json!({"service": "chat", "model": "katan-echo", "min_tier": 1, "target_nodes": 3}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let change: CatalogueChange = r.json().await.unwrap();
    let entry = CatalogueModel::new(Service::Chat, "katan-echo", 1, 3);
    assert_eq!(change.entry.as_ref(), Some(&entry));
    assert_eq!(change.removed_nodes, 0);
    let listed = admin_catalogue(&h).await;
    assert_eq!(listed.len(), builtin + 1);
    assert!(listed.contains(&entry));
    // Stored, so another host on the store sees it too.
    assert!(h.broker.store().catalogue().await.unwrap().contains(&entry));

    // A node may now serve it, and it is called.
    let r = api.post("", Some(reg)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    node.require_secret(v["node_secret"].as_str().unwrap());
    let id = ProvisionId::new(v["provision_id"].as_str().unwrap());
    let r = h
        .post("/v1/chat/completions", &user, &chat("katan-echo"))
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    // The public list: no credential, the price in force, the node count.
    let list = offers(&h).await;
    assert_eq!(list.object, "list");
    assert_eq!(list.data.len(), builtin + 1);
    let offer = list.data.iter().find(|o| o.model == "katan-echo").unwrap();
    assert_eq!(
        (offer.service, offer.min_tier, offer.target_nodes),
        (Service::Chat, 1, 3)
    );
    assert_eq!(offer.nodes, 1);
    assert_eq!(offer.price, chat_price());

    // Removed: its node leaves the pool (the answer says so), calls get
    // model_not_found, the public list no longer names it.
    let r = delete(&h, "chat", "katan-echo").await;
    assert_eq!(r.status(), 200);
    let change: CatalogueChange = r.json().await.unwrap();
    assert_eq!((change.entry, change.removed_nodes), (None, 1));
    let r = h
        .post("/v1/chat/completions", &user, &chat("katan-echo"))
        .await;
    expect_error(r, 404, "model_not_found").await;
    assert!(!h.is_routable(&id));
    assert!(offers(&h)
        .await
        .data
        .iter()
        .all(|o| o.model != "katan-echo"));
    // The store agrees: the node is kept, serving nothing.
    let stored = h.broker.store().pool_entries().await.unwrap();
    assert!(stored.iter().all(|e| e.provision_id != id));
    let view: Value = api.get(&format!("/{id}")).await.json().await.unwrap();
    assert_eq!(view["services"], json!([]));
    // Reporting ready with it again is refused.
    let ready =
        json!({"endpoint": node.url(), "services": [{"service": "chat", "model": "katan-echo"}]});
    let m = expect_error(
        api.post(&format!("/{id}/ready"), Some(ready)).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.contains("not in the catalogue"), "{m}");
    // Removing it again: not found.
    expect_error(delete(&h, "chat", "katan-echo").await, 404, "not_found").await;
    let _ = p;
    h.assert_ledger().await;
}

#[tokio::test]
async fn catalogue_changes_are_validated_and_admin_only() {
    let h = host().await;
    let (_, user) = h.user(Credits::whole(1)).await;
    let entry = |v: Value| {
        let mut e = json!({"service": "chat", "model": "ok:1b", "min_tier": 1, "target_nodes": 1});
        for (k, x) in v.as_object().unwrap() {
            e[k] = x.clone();
        }
        e
    };
    for (bad, why) in [
        (entry(json!({"min_tier": 0})), "min_tier must be 1-4"),
        (entry(json!({"min_tier": 5})), "min_tier must be 1-4"),
        (entry(json!({"model": ""})), "is empty, padded"),
        (entry(json!({"model": " padded"})), "is empty, padded"),
        (entry(json!({"model": "bell\u{7}"})), "control characters"),
        (entry(json!({"model": "x".repeat(201)})), "too long"),
        (entry(json!({"target_nodes": 100_001})), "at most 100000"),
        (entry(json!({"service": "teleport"})), "unknown variant"),
        (entry(json!({"min_tier": 300})), "expected u8"),
        (entry(json!({"price": 1})), "unknown field"),
        (json!({"service": "chat", "model": "x"}), "missing field"),
    ] {
        let m = expect_error(put(&h, bad.clone()).await, 400, "invalid_request").await;
        assert!(m.contains(why), "{bad}: {m}");
    }
    // Nothing was stored: the store still holds no catalogue.
    assert!(h.broker.store().catalogue().await.unwrap().is_empty());
    expect_error(delete(&h, "teleport", "x").await, 400, "invalid_request").await;
    expect_error(delete(&h, "chat", "never-listed").await, 404, "not_found").await;

    // Admins only; the public list needs nothing.
    let good = entry(json!({}));
    let as_user = call(&h, "PUT", "/v1/admin/catalogue")
        .bearer(user.expose())
        .json(good.clone());
    assert_eq!(as_user.status().await, 403);
    let anonymous = call(&h, "PUT", "/v1/admin/catalogue").json(good.clone());
    assert_eq!(anonymous.status().await, 401);
    let as_user =
        call(&h, "DELETE", format!("/v1/admin/catalogue/chat/{MODEL}")).bearer(user.expose());
    assert_eq!(as_user.status().await, 403);
    assert_eq!(call(&h, "GET", "/v1/admin/catalogue").status().await, 401);
    assert_eq!(call(&h, "GET", "/v1/catalogue").status().await, 200);
    assert_eq!(
        call(&h, "GET", "/v1/catalogue")
            .bearer(user.expose())
            .status()
            .await,
        200
    );
    assert!(put(&h, good).await.status().is_success());

    // A name with a slash and a colon round-trips through the path.
    let odd = "org/model:7b";
    assert!(put(&h, entry(json!({"model": odd})))
        .await
        .status()
        .is_success());
    let r = delete(&h, "chat", "org%2Fmodel:7b").await;
    assert_eq!(r.status(), 200);
    assert!(admin_catalogue(&h).await.iter().all(|m| m.model != odd));

    // The last model cannot go: an empty store means the built-in catalogue.
    let mut cfg = test_config();
    cfg.network.catalogue =
        Catalogue::new(vec![CatalogueModel::new(Service::Chat, MODEL, 1, 1)]).unwrap();
    let one = TestHost::start_with(Arc::new(MemoryStore::new()), |b| b.config(cfg)).await;
    expect_error(delete(&one, "chat", MODEL).await, 409, "conflict").await;
    assert_eq!(admin_catalogue(&one).await.len(), 1);
}

#[tokio::test]
async fn raising_a_minimum_tier_takes_lower_nodes_out_of_the_pool() {
    let h = host().await;
    let (_, user) = h.user(Credits::whole(10)).await;
    let (_, pkey) = h.provider().await;
    let api = ProviderApi::new(&h, &pkey);
    // A tier 1 node (no GPU) and a tier 3 one, both serving MODEL (tier 1).
    let small = StandInNode::start("small").await;
    let reg = json!({"endpoint": small.url(), "services": [{"service": "chat", "model": MODEL}]});
    let v: Value = api.post("", Some(reg)).await.json().await.unwrap();
    assert_eq!(v["tier"], 1);
    small.require_secret(v["node_secret"].as_str().unwrap());
    let small_id = ProvisionId::new(v["provision_id"].as_str().unwrap());
    let (big, _, big_id) = h.stand_in("big", Service::Chat, MODEL).await;

    let r = put(
        &h,
        json!({"service": "chat", "model": MODEL, "min_tier": 2, "target_nodes": 4}),
    )
    .await;
    let change: CatalogueChange = r.json().await.unwrap();
    assert_eq!(change.removed_nodes, 1);
    assert!(!h.is_routable(&small_id));
    assert!(h.is_routable(&big_id));
    for _ in 0..4 {
        let r = h.post("/v1/chat/completions", &user, &chat(MODEL)).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!((small.hits(), big.hits()), (0, 4));
    // Assignment follows the change: a tier 1 node is offered no chat model
    // needing tier 2.
    let start: Value = api
        .post(
            &format!("/{small_id}/start"),
            Some(json!({"services": ["chat"]})),
        )
        .await
        .json()
        .await
        .unwrap();
    let assigned = start["services"].as_array().unwrap();
    assert!(assigned.iter().all(|s| s["model"] != MODEL), "{start}");
    h.assert_ledger().await;
}

#[tokio::test]
async fn the_one_step_registration_obeys_the_catalogue_and_the_tiers() {
    let h = host().await;
    let (_, pkey) = h.provider().await;
    let api = ProviderApi::new(&h, &pkey);
    let node = StandInNode::start("n").await;
    let reg = |model: &str, vram: u64| {
        json!({"endpoint": node.url(), "services": [{"service": "chat", "model": model}],
               "device": {"gpu": {"memory_mb": vram}}})
    };
    // Not listed: refused, at any tier.
    let m = expect_error(
        api.post("", Some(reg("gpt-4o", 24_000))).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(m.contains("`gpt-4o` is not in the catalogue"), "{m}");
    // Listed, but above the node's tier: refused with the reason.
    let m = expect_error(
        api.post("", Some(reg("llama3.1:8b", 0))).await,
        400,
        "invalid_request",
    )
    .await;
    assert!(
        m.contains("needs a tier 2 node; this node is tier 1"),
        "{m}"
    );
    // One bad service among good ones refuses the whole registration.
    let mixed = json!({"endpoint": node.url(), "services": [
        {"service": "chat", "model": MODEL}, {"service": "embeddings", "model": "not-listed"}]});
    expect_error(api.post("", Some(mixed)).await, 400, "invalid_request").await;
    // The service counts: a chat model named as embeddings is not listed.
    let wrong =
        json!({"endpoint": node.url(), "services": [{"service": "embeddings", "model": MODEL}]});
    expect_error(api.post("", Some(wrong)).await, 400, "invalid_request").await;
    assert!(h.broker.store().pool_entries().await.unwrap().is_empty());
    assert_eq!(crate::common::listed(&api).await, 0);
    // Within the catalogue and the tier: registered and routed.
    let r = api.post("", Some(reg("llama3.1:8b", 4_096))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.broker.models().data.len(), 1);
    // Registering without services stays open (the lifecycle path).
    assert_eq!(api.post("", Some(json!({}))).await.status(), 200);
}

/// Prices that make charges of many sizes: a per-request fee and per-token
/// rates, chat and embeddings apart.
async fn mixed_prices(h: &TestHost) {
    let admin = h.broker.admin();
    admin.put_price(chat_price()).await.unwrap();
    admin
        .put_price(PriceEntry {
            service: Service::Embeddings,
            model: None,
            per_request: Credits(7),
            per_million_input_tokens: Credits(333_333),
            per_million_output_tokens: Credits::ZERO,
            per_million_units: Credits::ZERO,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_platform_share_is_exact_over_a_mixed_workload() {
    // Chat 20 % (the default), embeddings 33.3 %.
    let policy = PlatformShare::default()
        .with_service(Service::Embeddings, 333)
        .unwrap();
    let shares = |s: Service| i64::from(policy.share_permille(s));
    let h = TestHost::start_with(Arc::new(MemoryStore::new()), {
        let policy = policy.clone();
        move |b| b.reward_policy(Arc::new(policy))
    })
    .await;
    mixed_prices(&h).await;
    let (chat_node, _, _) = h.stand_in("chat", Service::Chat, MODEL).await;
    let (_embed_node, _, _) = h.stand_in("embed", Service::Embeddings, EMBED).await;
    let (u1, k1) = h.user(Credits::whole(5)).await;
    let (u2, k2) = h.user(Credits::whole(5)).await;

    // Requests of different sizes, on both services, from two users.
    for i in 0..40_u32 {
        let key = if i % 3 == 0 { &k1 } else { &k2 };
        let r = if i % 2 == 0 {
            // The node reports usage of many sizes (within the bounds).
            let (input, output) = (u64::from(i * 7 % 61), u64::from(i % 7));
            chat_node.set_usage(Some(cxmpute_core::wire::Usage {
                prompt_tokens: input,
                completion_tokens: output,
                total_tokens: input + output,
            }));
            let words = "word ".repeat(20 + i as usize);
            let body = json!({"model": MODEL, "max_tokens": 8,
                              "messages": [{"role": "user", "content": words}]});
            h.post("/v1/chat/completions", key, &body).await
        } else {
            let input: Vec<String> = (0..=i % 4)
                .map(|j| "x".repeat((i * 13 + j) as usize))
                .collect();
            h.post(
                "/v1/embeddings",
                key,
                &json!({"model": EMBED, "input": input}),
            )
            .await
        };
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }

    // Per call: reward = ⌊charge × (1000 − share) / 1000⌋, so the platform
    // keeps ⌈charge × share / 1000⌉.
    let store = h.broker.store();
    let mut expected_platform = 0_i64;
    let mut charges = std::collections::BTreeSet::new();
    let mut services = BTreeMap::new();
    for u in [&u1.id, &u2.id] {
        for r in store.usage_records(u, 1_000).await.unwrap() {
            let (c, w) = (r.charged.as_micros(), r.reward.as_micros());
            let share = shares(r.route.service());
            assert_eq!(w, c * (1_000 - share) / 1_000, "{r:?}");
            assert_eq!(c - w, (c * share + 999) / 1_000, "{r:?}");
            expected_platform += c - w;
            charges.insert(c);
            *services.entry(r.route.service()).or_insert(0) += 1;
        }
    }
    assert_eq!(services.values().sum::<i32>(), 40);
    assert_eq!(services.len(), 2);
    assert!(charges.len() >= 15, "charges of many sizes: {charges:?}");
    let totals = store.ledger_totals().await.unwrap();
    assert_eq!(
        totals.charged,
        totals.rewarded.saturating_add(totals.platform())
    );
    assert_eq!(totals.platform().as_micros(), expected_platform);
    assert!(totals.platform() > Credits::ZERO);
    h.assert_ledger().await;

    // Visible to the admin.
    let view: RewardPolicyView = call(&h, "GET", "/v1/admin/reward")
        .bearer(h.admin_key.expose())
        .ok()
        .await;
    assert_eq!(view.policy, "platform_share");
    assert_eq!(view.platform_share_permille[&Service::Chat], 200);
    assert_eq!(view.platform_share_permille[&Service::Embeddings], 333);
    assert_eq!(call(&h, "GET", "/v1/admin/reward").status().await, 401);

    // The admin's daily figures: charged = rewarded + platform.
    h.broker.flush_stats().await.unwrap();
    let stats: Value = call(&h, "GET", "/v1/stats/admin")
        .bearer(h.admin_key.expose())
        .ok()
        .await;
    let day = stats["days"].as_array().unwrap().last().unwrap();
    let n = |k: &str| day[k].as_i64().unwrap();
    assert_eq!(n("charged"), totals.charged.as_micros());
    assert_eq!(n("platform"), expected_platform);
    assert_eq!(n("charged"), n("rewarded") + n("platform"));
}

#[tokio::test]
async fn a_provider_is_never_paid_more_than_the_charge() {
    // A flat reward far above any charge is clamped to the charge.
    let h = TestHost::start_market(Credits::whole(1)).await;
    let (_node, p, _) = h.stand_in("n", Service::Chat, MODEL).await;
    let (u, key) = h.user(Credits::whole(1)).await;
    let r = h.post("/v1/chat/completions", &key, &chat(MODEL)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let rec = h.last_usage(&u.id).await;
    assert!(rec.charged > Credits::ZERO);
    assert_eq!(rec.reward, rec.charged);
    assert_eq!(h.earnings(&p.id).await, rec.charged);
    let totals = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!(totals.platform(), Credits::ZERO);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_config_file_seeds_the_catalogue_prices_and_policy() {
    let text = r#"
        [[catalogue]]
        service = "chat"
        model = "qwen2.5:0.5b"
        min_tier = 1
        target_nodes = 3

        [[catalogue]]
        service = "embeddings"
        model = "nomic-embed-text"
        min_tier = 1
        target_nodes = 2

        [[aliases]]
        alias = "small"
        models = ["qwen2.5:0.5b"]

        [[prices]]
        service = "chat"
        model = "qwen2.5:0.5b"
        per_request = 1234

        [reward]
        policy = "platform_share"
        [reward.platform_share_permille]
        chat = 250
    "#;
    let file = config::ConfigFile::parse(text).unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let start = |store: Arc<dyn Store>, file: config::ConfigFile| async move {
        let policy = file.reward_policy().unwrap();
        let h = TestHost::start_with(store, move |b| b.reward_policy(policy)).await;
        file.seed(&h.broker).await.unwrap();
        h
    };
    let h = start(store.clone(), file.clone()).await;

    // On a fresh store the file's models are the catalogue.
    let want = vec![
        CatalogueModel::new(Service::Chat, "qwen2.5:0.5b", 1, 3),
        CatalogueModel::new(Service::Embeddings, "nomic-embed-text", 1, 2),
    ];
    assert_eq!(admin_catalogue(&h).await, want);
    let offer = offers(&h).await.data.remove(0);
    assert_eq!(
        (offer.model.as_str(), offer.price.per_request),
        ("qwen2.5:0.5b", Credits(1_234))
    );
    let view: RewardPolicyView = call(&h, "GET", "/v1/admin/reward")
        .bearer(h.admin_key.expose())
        .ok()
        .await;
    assert_eq!(view.platform_share_permille[&Service::Chat], 250);
    assert_eq!(view.platform_share_permille[&Service::Tts], 200);
    // Nodes follow the file's catalogue: its model is served, the built-in
    // one it left out is refused.
    let (_node, _, _) = h.stand_in("q", Service::Chat, "qwen2.5:0.5b").await;
    let (_, user) = h.user(Credits::whole(1)).await;
    let r = h
        .post("/v1/chat/completions", &user, &chat("qwen2.5:0.5b"))
        .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // And so is the file's alias for it.
    let r = h.post("/v1/chat/completions", &user, &chat("small")).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let (_, pkey) = h.provider().await;
    let reg = json!({"endpoint": "http://127.0.0.1:9", "services": [{"service": "chat", "model": MODEL}]});
    expect_error(
        ProviderApi::new(&h, &pkey).post("", Some(reg)).await,
        400,
        "invalid_request",
    )
    .await;

    // Changed through the API meanwhile: one entry the file names, one it
    // does not.
    assert!(put(
        &h,
        json!({"service": "chat", "model": "qwen2.5:0.5b", "min_tier": 2, "target_nodes": 9})
    )
    .await
    .status()
    .is_success());
    assert!(put(
        &h,
        json!({"service": "tts", "model": "kokoro", "min_tier": 1, "target_nodes": 1})
    )
    .await
    .status()
    .is_success());
    h.assert_ledger().await;
    drop(h);

    // A restart seeds again: the file's entries are put back, the one only
    // in the store stays.
    let again = start(store, file).await;
    let listed = admin_catalogue(&again).await;
    assert_eq!(
        listed,
        vec![
            want[0].clone(),
            want[1].clone(),
            CatalogueModel::new(Service::Tts, "kokoro", 1, 1),
        ]
    );
}
