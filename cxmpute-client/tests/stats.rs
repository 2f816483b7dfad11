//! The stats API, metrics and the OpenAPI document against a real host on
//! loopback; and the client's coverage of every route the host documents.

mod common;

use std::collections::BTreeSet;

use common::{client_for, World, EMBED, MODEL};
use cxmpute_client::analytics::DateRange;
use cxmpute_client::types::{Credits, Day};
use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage, EmbeddingInput, EmbeddingsRequest};

/// Two chats and one embedding by the world's user, then the stats flushed.
async fn traffic(w: &World) {
    let chat = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")]);
    w.client().user().chat(&chat).await.unwrap();
    w.client().user().chat(&chat).await.unwrap();
    let emb = EmbeddingsRequest {
        model: EMBED.into(),
        input: EmbeddingInput::Text("one".into()),
        extra: Default::default(),
        models: Vec::new(),
    };
    w.client().user().embeddings(&emb).await.unwrap();
    w.host.broker.flush_stats().await.unwrap();
}

fn today(w: &World) -> DateRange {
    let d = w.host.broker.now().day();
    DateRange { from: d, to: d }
}

#[tokio::test]
async fn network_stats_are_public_and_without_money() {
    let w = World::start().await;
    traffic(&w).await;
    let net = w.anonymous().stats().network(None).await.unwrap();
    assert_eq!(net.range.to, w.host.broker.now().day());
    assert_eq!(net.days.len(), 30);
    assert_eq!(net.totals.requests, 3);
    assert_eq!((net.totals.charged, net.totals.rewarded), (None, None));
    assert_eq!(net.nodes_now, 2);
    let one_day = w
        .anonymous()
        .stats()
        .network(Some(today(&w)))
        .await
        .unwrap();
    assert_eq!((one_day.days.len(), one_day.totals.requests), (1, 3));
}

#[tokio::test]
async fn a_user_sees_its_own_usage_and_charges() {
    let w = World::start().await;
    traffic(&w).await;
    let mine = w.client().stats().me(Some(today(&w))).await.unwrap();
    assert_eq!(mine.user_id, w.user.id);
    assert_eq!(mine.totals.requests, 3);
    let charged = w
        .host
        .broker
        .store()
        .user(&w.user.id)
        .await
        .unwrap()
        .credits;
    assert_eq!(
        mine.totals.charged.map(|c| c.as_micros()),
        Some(Credits::whole(10).as_micros() - charged.as_micros())
    );
    let backwards = DateRange {
        from: Day(today(&w).to.0 + 1),
        to: today(&w).to,
    };
    let e = w.client().stats().me(Some(backwards)).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let e = w.anonymous().stats().me(None).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
}

#[tokio::test]
async fn a_provider_sees_its_earnings_and_nodes() {
    let w = World::start().await;
    traffic(&w).await;
    let (p2, key2) = w.host.provider().await;
    let provider = client_for(&w.host.url, &key2);
    let stats = provider.stats().provider(None).await.unwrap();
    assert_eq!(stats.provider_id, p2.id);
    assert!(stats.nodes.is_empty());
    assert_eq!(
        stats.totals.charged, None,
        "a provider never sees what users paid"
    );

    // The world keeps no provider key; a rotated one serves as well.
    let owner = w
        .host
        .broker
        .accounts()
        .rotate_provider_key(&w.provider)
        .await
        .unwrap();
    let owner = client_for(&w.host.url, &owner);
    let stats = owner.stats().provider(None).await.unwrap();
    let rewarded = w
        .host
        .broker
        .store()
        .ledger_totals()
        .await
        .unwrap()
        .rewarded;
    assert!(rewarded > Credits::ZERO);
    assert_eq!(stats.totals.requests, 3);
    assert_eq!(stats.totals.rewarded, Some(rewarded));
    assert_eq!(stats.earnings_total, rewarded);
    assert_eq!(stats.nodes.len(), 2);
}

#[tokio::test]
async fn an_admin_sees_everything_and_a_user_does_not() {
    let w = World::start().await;
    traffic(&w).await;
    let all = w.admin().stats().admin(None).await.unwrap();
    assert_eq!(all.totals.requests, 3);
    assert_eq!(all.ledger.settlements, 3);
    let ledger = w.host.broker.store().ledger_totals().await.unwrap();
    assert_eq!(
        (all.ledger.charged, all.ledger.rewarded),
        (ledger.charged, ledger.rewarded)
    );
    assert_eq!(all.top_users[0].name, w.user.id.as_str());
    let e = w.client().stats().admin(None).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let w = World::start().await;
    traffic(&w).await;
    let text = w.anonymous().stats().metrics().await.unwrap();
    assert!(text.lines().any(|l| l.starts_with("# TYPE ")), "{text}");
    assert!(text
        .lines()
        .any(|l| !l.starts_with('#') && !l.trim().is_empty()));
}

/// Every route the client calls, as `METHOD /path` in the OpenAPI document's
/// spelling. Each is exercised against the host by the other tests; this
/// list is checked against the document both ways.
const CLIENT_ROUTES: &[&str] = &[
    "GET /healthz",
    "GET /pages/{token}",
    "GET /openapi.json",
    "GET /metrics",
    "GET /v1/models",
    "GET /v1/catalogue",
    "POST /v1/chat/completions",
    "POST /v1/embeddings",
    "POST /v1/audio/speech",
    "POST /v1/tts",
    "POST /v1/scrape",
    "POST /v1/m/caption",
    "POST /v1/m/query",
    "POST /v1/m/detect",
    "POST /v1/m/point",
    "POST /v1/auth/code",
    "POST /v1/auth/verify",
    "POST /v1/auth/refresh",
    "POST /v1/auth/logout",
    "GET /v1/me",
    "PATCH /v1/me",
    "GET /v1/me/usage",
    "GET /v1/me/keys",
    "POST /v1/me/keys",
    "PATCH /v1/me/keys/{id}",
    "DELETE /v1/me/keys/{id}",
    "GET /v1/notifications",
    "POST /v1/provider/provisions",
    "GET /v1/provider/provisions",
    "GET /v1/provider/provisions/{id}",
    "DELETE /v1/provider/provisions/{id}",
    "POST /v1/provider/provisions/{id}/start",
    "POST /v1/provider/provisions/{id}/ready",
    "POST /v1/provider/provisions/{id}/heartbeat",
    "POST /v1/provider/provisions/{id}/end",
    "GET /v1/provider/account",
    "POST /v1/provider/account/key",
    "GET /v1/provider/account/earnings",
    "GET /v1/provider/account/provisions",
    "GET /v1/admin/users",
    "POST /v1/admin/users",
    "GET /v1/admin/users/{id}",
    "PATCH /v1/admin/users/{id}",
    "POST /v1/admin/users/{id}/credits",
    "PATCH /v1/admin/keys/{id}",
    "POST /v1/admin/users/{id}/suspend",
    "POST /v1/admin/users/{id}/unsuspend",
    "POST /v1/admin/providers",
    "GET /v1/admin/providers/{id}",
    "POST /v1/admin/providers/{id}/suspend",
    "POST /v1/admin/providers/{id}/unsuspend",
    "GET /v1/admin/provisions",
    "DELETE /v1/admin/provisions/{id}",
    "GET /v1/admin/prices",
    "PUT /v1/admin/prices",
    "GET /v1/admin/catalogue",
    "PUT /v1/admin/catalogue",
    "DELETE /v1/admin/catalogue/{service}/{model}",
    "GET /v1/admin/aliases",
    "PUT /v1/admin/aliases",
    "DELETE /v1/admin/aliases/{alias}",
    "GET /v1/admin/reward",
    "GET /v1/admin/notifications",
    "POST /v1/admin/notifications",
    "PUT /v1/admin/notifications/{id}",
    "DELETE /v1/admin/notifications/{id}",
    "GET /v1/stats/network",
    "GET /v1/stats/me",
    "GET /v1/stats/provider",
    "GET /v1/stats/admin",
];

/// Routes for browsers, not for a programmatic client.
fn is_browser_page(path: &str) -> bool {
    path == "/dashboard" || path.starts_with("/dashboard/")
}

#[tokio::test]
async fn the_client_covers_every_route_the_host_documents() {
    let w = World::start().await;
    let doc = w.anonymous().openapi().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str())
                && !is_browser_page(path)
            {
                documented.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    assert!(
        documented.contains("POST /v1/chat/completions"),
        "{documented:?}"
    );
    let called: BTreeSet<String> = CLIENT_ROUTES.iter().map(|s| s.to_string()).collect();
    // A route the host serves and documents needs a typed method here.
    let missing: Vec<_> = documented.difference(&called).collect();
    assert!(
        missing.is_empty(),
        "routes the host serves without a cxmpute-client method: {missing:?}"
    );
    // And the client calls nothing the host does not serve.
    let unknown: Vec<_> = called.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "client routes the host does not serve: {unknown:?}"
    );
}
