//! Verification over real sockets: canary calls through the gateway to
//! stand-in nodes that tell the truth (with the noise real hardware adds) or
//! lie, quarantine and re-qualification, what providers and the admin see,
//! the score's effect on selection and reward, and the money.

use std::sync::Arc;

use cxmpute_core::testkit::*;
use cxmpute_core::verify::{PinnedAnswer, PinnedReference, VerifyConfig};
use cxmpute_core::wire::{AdminProvisionView, ProvisionView, VerificationStatus};
use cxmpute_core::*;
use serde_json::{json, Value};

use crate::common::call;

/// The stand-in model honest nodes run.
const TRUE_MODEL: u64 = 1;

/// A market host whose verification settings `f` adjusts (canaries are run
/// by the tests, never on a timer).
async fn host(f: impl FnOnce(&mut VerifyConfig)) -> TestHost {
    let mut v = VerifyConfig::default();
    v.interval = None;
    f(&mut v);
    TestHost::start_market_with(Arc::new(MemoryStore::new()), Credits(2_000), move |b| {
        let mut c = test_config();
        c.verify = v;
        b.config(c)
    })
    .await
}

/// A node running `answers` for a new provider; the node, its provider's
/// key and its id.
async fn node(
    h: &TestHost,
    answers: Answers,
    service: Service,
    model: &str,
) -> (StandInNode, Secret, ProvisionId) {
    let n = StandInNode::start("n").await;
    n.set_answers(answers);
    let (p, key) = h.provider().await;
    let id = h.add_node(&p, &n, service, model).await;
    (n, key, id)
}

/// An honest node with noise `noise` drawn from generator `seed`.
fn honest(noise: f64, seed: u64) -> Answers {
    Answers::Model {
        seed: TRUE_MODEL,
        noise,
        noise_seed: seed,
    }
}

async fn status_of(h: &TestHost, key: &Secret) -> ProvisionView {
    let mut v: Vec<ProvisionView> = call(h, "GET", "/v1/provider/provisions")
        .bearer(key.expose())
        .ok()
        .await;
    assert_eq!(v.len(), 1);
    v.remove(0)
}

/// Runs a round of canaries.
async fn round(h: &TestHost) -> verify::CanaryReport {
    h.broker.run_canaries().await.expect("a canary round")
}

/// Counts the canary account in the ledger check (made by the first round).
fn track_canaries(h: &TestHost) {
    let id = h
        .broker
        .canary_account_id()
        .expect("the canary account exists");
    h.track_user(&id, Credits::ZERO);
}

#[tokio::test]
async fn liars_are_quarantined_in_two_rounds_and_their_providers_and_the_admin_see_why() {
    let h = host(|_| {}).await;
    let mut honest_emb = Vec::new();
    for s in 0..3 {
        honest_emb.push(node(&h, honest(0.05, s), Service::Embeddings, EMBED).await);
    }
    let other_model = node(&h, Answers::model(2), Service::Embeddings, EMBED).await;
    let mut honest_chat = Vec::new();
    for s in 10..13 {
        honest_chat.push(node(&h, honest(0.05, s), Service::Chat, MODEL).await);
    }
    let canned = node(
        &h,
        Answers::Canned("I am a big model.".into()),
        Service::Chat,
        MODEL,
    )
    .await;
    let smaller = node(&h, Answers::model(3), Service::Chat, MODEL).await;
    let liars = [&other_model, &canned, &smaller];

    let r = round(&h).await;
    track_canaries(&h);
    assert_eq!((r.calls, r.passed, r.failed), (9, 6, 3), "{r:?}");
    assert!(r.quarantined.is_empty(), "one failure is not enough");
    for (_, key, id) in liars {
        assert!(h.is_routable(id));
        let v = status_of(&h, key).await.verification;
        assert_eq!(v.status, VerificationStatus::Suspect);
        assert_eq!((v.passed, v.failed, v.score_permille), (0, 1, 500));
    }
    let r = round(&h).await;
    assert_eq!(r.quarantined.len(), 3, "{r:?}");
    for (_, key, id) in liars {
        assert!(!h.is_routable(id), "a quarantined node leaves routing");
        assert!(h.broker.network().node_status(id).unwrap().quarantined);
        let v = status_of(&h, key).await;
        assert!(!v.healthy);
        assert_eq!(v.verification.status, VerificationStatus::Quarantined);
        let why = v.verification.reason.expect("the provider is told why");
        assert!(
            why.contains("disagreed") || why.contains("differed"),
            "{why}"
        );
    }
    for (_, key, id) in honest_emb.iter().chain(&honest_chat) {
        assert!(h.is_routable(id));
        let v = status_of(&h, key).await.verification;
        assert_eq!(
            (v.status, v.passed, v.failed),
            (VerificationStatus::Verified, 2, 0)
        );
    }
    // The admin sees every node's standing.
    let all: Vec<AdminProvisionView> = call(&h, "GET", "/v1/admin/provisions")
        .bearer(h.admin_key.expose())
        .ok()
        .await;
    let quarantined = (all.iter())
        .filter(|n| n.provision.verification.status == VerificationStatus::Quarantined)
        .count();
    assert_eq!((all.len(), quarantined), (9, 3));

    // Users' calls reach only the nodes that passed.
    let before: Vec<usize> = liars.iter().map(|(n, _, _)| n.hits()).collect();
    let (_, key) = h.user(Credits::whole(10)).await;
    for _ in 0..12 {
        let r = h
            .post("/v1/chat/completions", &key, &crate::common::chat())
            .await;
        assert_eq!(r.status(), 200);
        let e = json!({"model": EMBED, "input": "hello"});
        assert_eq!(h.post("/v1/embeddings", &key, &e).await.status(), 200);
    }
    let after: Vec<usize> = liars.iter().map(|(n, _, _)| n.hits()).collect();
    assert_eq!(before, after);
    // Operators see it on the metrics page.
    let page = reqwest::get(format!("{}/metrics", h.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("cxmpute_quarantined_nodes 3"), "{page}");
    let fails = "cxmpute_canary_verdicts_total{service=\"chat\",verdict=\"fail\"} 4";
    assert!(page.contains(fails), "{page}");
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_quarantined_node_requalifies_after_passing_again() {
    let h = host(|_| {}).await;
    let mut nodes = Vec::new();
    for s in 0..2 {
        nodes.push(node(&h, honest(0.02, s), Service::Embeddings, EMBED).await);
    }
    let (liar, key, id) = node(&h, Answers::model(9), Service::Embeddings, EMBED).await;
    round(&h).await;
    track_canaries(&h);
    assert_eq!(round(&h).await.quarantined, vec![id.clone()]);
    assert!(!h.is_routable(&id));
    // Fixed: it runs the model it claims now. Quarantined, it is still
    // sent canaries, and three passes in a row bring it back.
    liar.set_answers(honest(0.02, 7));
    for _ in 0..2 {
        let r = round(&h).await;
        assert!(r.requalified.is_empty());
        assert!(!h.is_routable(&id));
    }
    assert_eq!(round(&h).await.requalified, vec![id.clone()]);
    assert!(h.is_routable(&id));
    let v = status_of(&h, &key).await.verification;
    assert_eq!((v.status, v.reason), (VerificationStatus::Verified, None));
    assert_eq!((v.passed, v.failed), (3, 2));
    h.assert_ledger().await;
}

#[tokio::test]
async fn honest_nodes_with_noise_inside_the_tolerance_are_never_quarantined_in_1000_rounds() {
    let h = host(|_| {}).await;
    let mut all = Vec::new();
    // Relative noise of 10 % on every component (far more than int8
    // quantization's) and chat endings that drift after the stable tokens.
    for s in 0..3 {
        all.push(node(&h, honest(0.10, 100 + s), Service::Embeddings, EMBED).await);
        all.push(node(&h, honest(0.10, 200 + s), Service::Chat, MODEL).await);
    }
    let mut verdicts = 0;
    for i in 0..1000 {
        let r = round(&h).await;
        assert_eq!((r.failed, r.inconclusive), (0, 0), "round {i}: {r:?}");
        verdicts += r.passed;
    }
    assert_eq!(verdicts, 6_000);
    for (_, _, id) in &all {
        assert!(h.is_routable(id));
        let v = h.broker.network().node_status(id).unwrap();
        assert!(!v.quarantined);
    }
    track_canaries(&h);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_lone_node_is_checked_against_what_the_operator_pinned() {
    let text = "The river runs under the old stone bridge.";
    let prompt = "Write one sentence about the harbor at night.";
    let h = host(|v| {
        v.references = vec![
            PinnedReference {
                service: Service::Embeddings,
                model: EMBED.into(),
                input: text.into(),
                answer: PinnedAnswer::Vector(model_embedding(TRUE_MODEL, text)),
            },
            PinnedReference {
                service: Service::Chat,
                model: MODEL.into(),
                input: prompt.into(),
                answer: PinnedAnswer::Text(model_chat(TRUE_MODEL, prompt)),
            },
        ];
    })
    .await;
    // One liar alone in each pool: no majority to ask, the reference tells.
    let (_liar, _, emb) = node(&h, Answers::model(5), Service::Embeddings, EMBED).await;
    let (small, _, chat) = node(&h, Answers::model(6), Service::Chat, MODEL).await;
    round(&h).await;
    track_canaries(&h);
    let r = round(&h).await;
    assert_eq!(r.quarantined.len(), 2, "{r:?}");
    assert!(!h.is_routable(&emb) && !h.is_routable(&chat));
    // The canary was the pinned prompt, at temperature 0, with nothing else
    // in it a user's call would not have.
    let body = small.last_body().unwrap();
    assert_eq!(body["messages"][0]["content"], prompt);
    assert_eq!(body["temperature"].as_f64(), Some(0.0));
    // Streamed or not, as users call; nothing else.
    let mut keys: Vec<&str> = (body.as_object().unwrap().keys())
        .map(String::as_str)
        .filter(|k| !["stream", "stream_options"].contains(k))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "max_completion_tokens",
            "max_tokens",
            "messages",
            "model",
            "seed",
            "temperature"
        ]
    );
    // An honest node beside the quarantined liar (two: still too few for a
    // majority) passes against the references.
    let (_honest, key, ok) = node(&h, honest(0.05, 1), Service::Embeddings, EMBED).await;
    let r = round(&h).await;
    assert_eq!((r.passed, r.failed), (1, 2), "{r:?}");
    assert!(h.is_routable(&ok));
    let v = status_of(&h, &key).await.verification;
    assert_eq!(v.status, VerificationStatus::Verified);
    h.assert_ledger().await;
}

#[tokio::test]
async fn canaries_cost_users_nothing_are_paid_like_calls_and_stay_out_of_user_statistics() {
    let h = host(|_| {}).await;
    let mut nodes = Vec::new();
    for s in 0..3 {
        nodes.push(node(&h, honest(0.05, s), Service::Chat, MODEL).await);
    }
    let (user, key) = h.user(Credits::whole(10)).await;
    for _ in 0..3 {
        let r = h
            .post("/v1/chat/completions", &key, &crate::common::chat())
            .await;
        assert_eq!(r.status(), 200);
    }
    let paid_by_user = Credits::whole(10).saturating_sub(h.balance(&user.id).await);
    round(&h).await;
    let first = node_bodies(&nodes);
    for _ in 0..3 {
        round(&h).await;
    }
    track_canaries(&h);
    // Varied: each round a new prompt and a new seed, the same for every node.
    let last = node_bodies(&nodes);
    assert_ne!(first[0]["seed"], last[0]["seed"]);
    assert_eq!(last[0], last[1]);
    assert_eq!(
        Credits::whole(10).saturating_sub(h.balance(&user.id).await),
        paid_by_user,
        "users pay nothing for canaries"
    );
    // The platform's account paid for 12 canaries, and each node earned the
    // same reward a user's call earns.
    let canary = h.broker.canary_account_id().unwrap();
    let records = h.broker.store().usage_records(&canary, 100).await.unwrap();
    assert_eq!(records.len(), 12);
    // The reward policy's rule for any call: the flat reward, at most the charge.
    let rule = |r: &UsageRecord| r.success && r.reward == Credits(2_000).min(r.charged);
    assert!(rule(&h.last_usage(&user.id).await));
    assert!(records.iter().all(|r| rule(r) && r.charged > Credits::ZERO));
    // Statistics: users' and the network's figures count the 3 user calls,
    // providers' figures count what they were paid for.
    h.broker.flush_stats().await.unwrap();
    let stats: Value = call(&h, "GET", "/v1/stats/admin")
        .bearer(h.admin_key.expose())
        .ok()
        .await;
    assert_eq!(stats["totals"]["requests"], 3, "{stats}");
    assert_eq!(stats["top_users"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(stats["ledger"]["settlements"], 15, "{stats}");
    h.assert_ledger().await;
}

fn node_bodies(nodes: &[(StandInNode, Secret, ProvisionId)]) -> Vec<Value> {
    nodes
        .iter()
        .map(|(n, _, _)| n.last_body().unwrap())
        .collect()
}

#[tokio::test]
async fn the_score_steers_selection_and_scales_rewards() {
    // Below any chat call's charge (1,000 a request plus tokens), so the
    // clamp to the charge never hides the policy's reward.
    let reward = Credits(1_000);
    let mut v = VerifyConfig::default();
    v.interval = None;
    // Kept in routing with a low score, to see what the score alone does.
    v.quarantine_after = 100;
    let h = TestHost::start_market_with(Arc::new(MemoryStore::new()), reward, move |b| {
        let mut c = test_config();
        c.verify = v;
        b.config(c)
            .selector(Arc::new(VerifiedFirst::new(RoundRobinSelector, 900)))
            .reward_policy(Arc::new(VerifiedReward(FlatReward(reward))))
    })
    .await;
    let mut honest_nodes = Vec::new();
    for s in 0..2 {
        honest_nodes.push(node(&h, honest(0.05, s), Service::Chat, MODEL).await);
    }
    let (liar, _, liar_id) = node(&h, Answers::model(4), Service::Chat, MODEL).await;
    round(&h).await;
    track_canaries(&h);
    assert!(h.is_routable(&liar_id));
    assert_eq!(
        h.broker
            .network()
            .node_status(&liar_id)
            .map(|s| s.quarantined),
        Some(false)
    );
    // Selection: with two trusted nodes, the suspect one gets no user call.
    let hits = liar.hits();
    let (user, key) = h.user(Credits::whole(10)).await;
    for _ in 0..20 {
        let r = h
            .post("/v1/chat/completions", &key, &crate::common::chat())
            .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(liar.hits(), hits);
    assert_eq!(h.last_usage(&user.id).await.reward, reward);
    // Reward: its next canary is paid at its score (500 per mille).
    round(&h).await;
    let canary = h.broker.canary_account_id().unwrap();
    let records = h.broker.store().usage_records(&canary, 100).await.unwrap();
    let liars: Vec<Credits> = (records.iter())
        .filter(|r| r.provision_id.as_ref() == Some(&liar_id))
        .map(|r| r.reward)
        .collect();
    assert_eq!(liars.len(), 2);
    assert!(
        liars.contains(&reward) && liars.contains(&Credits(500)),
        "{liars:?}"
    );
    // The trusted nodes alone left: the suspect one serves when it must.
    for (n, _, id) in &honest_nodes {
        h.set_node_healthy(id, false);
        let _ = n;
    }
    let r = h
        .post("/v1/chat/completions", &key, &crate::common::chat())
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(liar.hits(), hits + 2);
    h.assert_ledger().await;
}

#[tokio::test]
async fn speech_cut_short_or_canned_is_quarantined_and_plausible_speech_passes() {
    let h = host(|_| {}).await;
    let model = wire::DEFAULT_TTS_MODEL;
    let (_honest, key, ok) = node(&h, honest(0.0, 0), Service::Tts, model).await;
    let (_cut, _, cut) = node(&h, Answers::TruncatedAudio, Service::Tts, model).await;
    let canned = Answers::Canned(String::new());
    let (_canned, _, short) = node(&h, canned, Service::Tts, model).await;
    let r = round(&h).await;
    track_canaries(&h);
    assert_eq!((r.calls, r.passed, r.failed), (3, 1, 2), "{r:?}");
    let r = round(&h).await;
    let mut q = r.quarantined.clone();
    q.sort();
    let mut want = vec![cut.clone(), short.clone()];
    want.sort();
    assert_eq!(q, want);
    assert!(h.is_routable(&ok) && !h.is_routable(&cut) && !h.is_routable(&short));
    let v = status_of(&h, &key).await.verification;
    assert_eq!((v.status, v.passed), (VerificationStatus::Verified, 2));
    let all: Vec<AdminProvisionView> = call(&h, "GET", "/v1/admin/provisions")
        .bearer(h.admin_key.expose())
        .ok()
        .await;
    let cut_view = all
        .iter()
        .find(|n| n.provision.provision_id == cut)
        .unwrap();
    let why = cut_view.provision.verification.reason.clone().unwrap();
    assert!(why.contains("lasted"), "{why}");
    h.assert_ledger().await;
}

/// A reverse proxy on its own address in front of a host's canary pages, as
/// an operator would run one under a name of its own: its address is known
/// before the host starts (the host's configuration names it); the host it
/// forwards to is set once that listens.
async fn page_proxy() -> (String, Arc<parking_lot::Mutex<String>>) {
    let target = Arc::new(parking_lot::Mutex::new(String::new()));
    let t = target.clone();
    let app = axum::Router::new().route(
        "/pages/{token}",
        axum::routing::get(
            move |axum::extract::Path(token): axum::extract::Path<String>| {
                let t = t.clone();
                async move {
                    let url = format!("{}/pages/{token}", t.lock());
                    let r = reqwest::get(url).await.unwrap();
                    let status = axum::http::StatusCode::from_u16(r.status().as_u16()).unwrap();
                    (status, r.text().await.unwrap())
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, target)
}

#[tokio::test]
async fn a_scraper_must_return_the_page_the_broker_serves_for_the_canary() {
    let (proxy, target) = page_proxy().await;
    let h = host(|v| v.page_base = Some(proxy)).await;
    *target.lock() = h.url.clone();
    let model = wire::DEFAULT_SCRAPE_MODEL;
    let (_a, key, honest_id) = node(&h, Answers::Fixed, Service::Scrape, model).await;
    let canned = Answers::Canned("<html><body>Welcome!</body></html>".into());
    let (liar, _, liar_id) = node(&h, canned, Service::Scrape, model).await;
    let r = round(&h).await;
    track_canaries(&h);
    assert_eq!((r.calls, r.passed, r.failed), (2, 1, 1), "{r:?}");
    assert_eq!(round(&h).await.quarantined, vec![liar_id.clone()]);
    assert!(h.is_routable(&honest_id) && !h.is_routable(&liar_id));
    let v = status_of(&h, &key).await.verification;
    assert_eq!((v.status, v.passed), (VerificationStatus::Verified, 2));
    // The page named lived for its canary only.
    let asked = liar.last_body().unwrap();
    let url = asked["urls"][0].as_str().unwrap().to_owned();
    let token = url.rsplit('/').next().unwrap();
    let r = reqwest::get(format!("{}/pages/{token}", h.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::get(format!("{}/pages/made-up", h.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    h.assert_ledger().await;
}

#[tokio::test]
async fn hosts_and_restarts_share_one_canary_key() {
    let store = Arc::new(MemoryStore::new());
    let start = || {
        TestHost::start_market_with(store.clone(), Credits(1_000), |b| {
            let mut c = test_config();
            c.verify.interval = None;
            c.auth.session_secret = Some(Secret::new("s".repeat(40)));
            b.config(c)
        })
    };
    let mut keys = Vec::new();
    for _ in 0..3 {
        let h = start().await;
        let _node = node(&h, honest(0.0, 0), Service::Embeddings, EMBED).await;
        round(&h).await;
        let canary = h.broker.canary_account_id().unwrap();
        keys = h.broker.store().api_keys(&canary).await.unwrap();
    }
    assert_eq!(keys.len(), 1, "{keys:?}");
}

#[tokio::test]
async fn chat_canaries_come_streamed_and_not_and_a_node_lying_on_either_is_caught() {
    let h = host(|_| {}).await;
    let mut nodes = Vec::new();
    for s in 0..3 {
        nodes.push(node(&h, honest(0.05, s), Service::Chat, MODEL).await);
    }
    let (liar, _, liar_id) = node(&h, Answers::model(8), Service::Chat, MODEL).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = round(&h).await;
        // Quarantined after two, it is still sent canaries: each round,
        // streamed or not, finds it wrong.
        assert_eq!((r.passed, r.failed), (3, 1), "{r:?}");
        seen.insert(
            liar.last_body().unwrap()["stream"]
                .as_bool()
                .unwrap_or(false),
        );
    }
    assert_eq!(seen.len(), 2, "both kinds were sent");
    assert!(!h.is_routable(&liar_id));
    track_canaries(&h);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_quarantined_node_that_ends_and_starts_again_is_still_out() {
    let h = host(|_| {}).await;
    let mut nodes = Vec::new();
    for s in 0..2 {
        nodes.push(node(&h, honest(0.0, s), Service::Embeddings, EMBED).await);
    }
    let (_liar, _, id) = node(&h, Answers::model(3), Service::Embeddings, EMBED).await;
    round(&h).await;
    track_canaries(&h);
    round(&h).await;
    assert!(!h.is_routable(&id));
    // It leaves the index (ended, or another host deleted it) and joins again.
    h.unroute_node(&id);
    round(&h).await;
    h.broker.refresh_pools().await.unwrap();
    assert!(h.broker.network().node_status(&id).is_some());
    assert!(!h.is_routable(&id), "its quarantine held");
    // A week later a departed node's record is forgotten.
    h.unroute_node(&id);
    h.clock
        .advance(std::time::Duration::from_secs(8 * 24 * 3600));
    round(&h).await;
    h.broker.refresh_pools().await.unwrap();
    assert_eq!(
        h.broker.network().node_status(&id).map(|s| s.quarantined),
        Some(false)
    );
    h.assert_ledger().await;
}
