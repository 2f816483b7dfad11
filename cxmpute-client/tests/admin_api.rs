//! The admin API against a real host router on loopback.

mod common;

use common::{client_for, World, MODEL};
use cxmpute_client::types::{Credits, PriceEntry, Service, UserId};
use cxmpute_client::wire::{
    ChatCompletionRequest, ChatMessage, CreateProviderRequest, CreateUserRequest,
    GrantCreditsRequest, RegisterProvisionRequest, ServedModel,
};
use cxmpute_core::testkit::StandInNode;
use cxmpute_core::Secret;

#[tokio::test]
async fn create_a_user_grant_credits_and_call_with_its_key() {
    let w = World::start().await;
    let admin = w.admin();
    let created = admin
        .admin()
        .create_user(&CreateUserRequest {
            email: "ada@example.com".into(),
            credits: Credits(500),
        })
        .await
        .unwrap();
    assert!(created.api_key.starts_with("cx-"));
    let user = client_for(&w.host.url, &Secret::new(created.api_key.clone()));
    let req = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")]);
    let e = user.user().chat(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(402), "{e}");

    let grant = GrantCreditsRequest {
        amount: Credits::whole(2),
        reason: "welcome".into(),
    };
    let balance = admin
        .admin()
        .grant_credits(&created.user_id, &grant)
        .await
        .unwrap();
    assert_eq!(balance.user_id, created.user_id);
    assert_eq!(balance.credits, Credits(2_000_500));
    user.user().chat(&req).await.unwrap();

    let e = admin
        .admin()
        .grant_credits(&UserId::new("usr_nobody"), &grant)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let dup = CreateUserRequest {
        email: "ada@example.com".into(),
        credits: Credits::ZERO,
    };
    let e = admin.admin().create_user(&dup).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
}

#[tokio::test]
async fn create_a_provider_whose_key_registers_a_node() {
    let w = World::start().await;
    let created = w
        .admin()
        .admin()
        .create_provider(&CreateProviderRequest {
            email: "gpu@example.com".into(),
        })
        .await
        .unwrap();
    let provider = w.admin().with_bearer(created.provider_key);
    let node = StandInNode::start("new").await;
    let reg = provider
        .provider()
        .register(&RegisterProvisionRequest {
            endpoint: Some(node.url()),
            services: vec![ServedModel {
                service: Service::Chat,
                model: MODEL.into(),
            }],
            device: serde_json::Value::Null,
            location: Default::default(),
        })
        .await
        .unwrap();
    let stored = w
        .host
        .broker
        .store()
        .provision(&reg.provision_id)
        .await
        .unwrap();
    assert_eq!(stored.provider_id, created.provider_id);
}

#[tokio::test]
async fn put_a_price_and_read_it_back() {
    let w = World::start().await;
    let price = PriceEntry {
        service: Service::Embeddings,
        model: Some("nomic-embed-text".into()),
        per_request: Credits(7),
        per_million_input_tokens: Credits::whole(3),
        per_million_output_tokens: Credits::ZERO,
        per_million_units: Credits::ZERO,
    };
    assert_eq!(w.admin().admin().put_price(&price).await.unwrap(), price);
    let prices = w.admin().admin().prices().await.unwrap();
    assert!(prices.contains(&price), "{prices:?}");
    assert!(prices.contains(&common::chat_price()));
    // Replacing keeps one entry per (service, model).
    let cheaper = PriceEntry {
        per_request: Credits(1),
        ..price.clone()
    };
    w.admin().admin().put_price(&cheaper).await.unwrap();
    let prices = w.admin().admin().prices().await.unwrap();
    assert!(prices.contains(&cheaper) && !prices.contains(&price));
}

#[tokio::test]
async fn a_user_key_is_refused_by_every_admin_call() {
    let w = World::start().await;
    let not_admin = w.client();
    let a = not_admin.admin();
    let grant = GrantCreditsRequest {
        amount: Credits::whole(1_000),
        reason: "me".into(),
    };
    let errors = [
        a.create_user(&CreateUserRequest {
            email: "x@example.com".into(),
            credits: Credits::ZERO,
        })
        .await
        .unwrap_err(),
        a.grant_credits(&w.user.id, &grant).await.unwrap_err(),
        a.create_provider(&CreateProviderRequest {
            email: "y@example.com".into(),
        })
        .await
        .unwrap_err(),
        a.put_price(&common::chat_price()).await.unwrap_err(),
        a.prices().await.unwrap_err(),
    ];
    for e in errors {
        assert_eq!(
            (e.status(), e.code()),
            (Some(403), Some("forbidden")),
            "{e}"
        );
    }
    assert_eq!(w.balance().await, Credits::whole(10));
}
