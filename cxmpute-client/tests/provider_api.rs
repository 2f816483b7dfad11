//! The provider API against a real host router on loopback: a node's whole
//! life through the client, as the provider node program drives it.

mod common;

use common::{client_for, World, MODEL};
use cxmpute_client::types::{Location, ProvisionId, ProvisionState, Service};
use cxmpute_client::wire::{
    ChatCompletionRequest, ChatMessage, ReadyProvisionRequest, RegisterProvisionRequest,
    ServedModel, StartProvisionRequest,
};
use cxmpute_core::testkit::StandInNode;

fn registration(endpoint: String, model: &str) -> RegisterProvisionRequest {
    RegisterProvisionRequest {
        endpoint: Some(endpoint),
        services: vec![ServedModel {
            service: Service::Chat,
            model: model.into(),
        }],
        device: serde_json::json!({"gpu": {"memory_mb": 24576}}),
        location: Location {
            country: "NL".into(),
            ..Location::default()
        },
    }
}

#[tokio::test]
async fn register_list_heartbeat_and_end_a_node() {
    let w = World::start().await;
    let (_, provider_key) = w.host.provider().await;
    let provider = client_for(&w.host.url, &provider_key);
    let node = StandInNode::start("mine").await;
    w.host.offer(Service::Chat, "phi4:14b").await;

    let reg = provider
        .provider()
        .register(&registration(node.url(), "phi4:14b"))
        .await
        .unwrap();
    assert_eq!(reg.state, ProvisionState::Ready);
    assert!(!reg.node_secret.expose().is_empty());
    node.require_secret(reg.node_secret.expose());

    let list = provider.provider().provisions().await.unwrap();
    assert_eq!(list.len(), 1);
    let view = &list[0];
    assert_eq!(view.provision_id, reg.provision_id);
    assert_eq!(view.endpoint.as_deref(), Some(node.url().as_str()));
    assert_eq!(
        view.services,
        vec![ServedModel {
            service: Service::Chat,
            model: "phi4:14b".into()
        }]
    );
    assert_eq!(view.location.country, "NL");
    assert!(view.healthy);

    // The node serves users at once.
    let req = ChatCompletionRequest::new("phi4:14b", vec![ChatMessage::user("hi")]);
    let answer = w.client().user().chat(&req).await.unwrap();
    assert_eq!(
        answer.choices[0].message.text().as_deref(),
        Some("Hello from mine")
    );

    let before = w
        .host
        .broker
        .store()
        .provision(&reg.provision_id)
        .await
        .unwrap()
        .last_heartbeat;
    w.host.clock.advance(std::time::Duration::from_secs(30));
    provider
        .provider()
        .heartbeat(&reg.provision_id)
        .await
        .unwrap();
    let after = w
        .host
        .broker
        .store()
        .provision(&reg.provision_id)
        .await
        .unwrap()
        .last_heartbeat;
    assert!(after > before);

    // Ended: out of every pool, but kept.
    provider.provider().end(&reg.provision_id).await.unwrap();
    let ended = provider
        .provider()
        .provision(&reg.provision_id)
        .await
        .unwrap();
    assert_eq!(ended.state, ProvisionState::Ended);
    assert!(!ended.healthy);
    let e = w.client().user().chat(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");

    // Deleted: forgotten.
    provider.provider().delete(&reg.provision_id).await.unwrap();
    assert!(provider.provider().provisions().await.unwrap().is_empty());
    let e = provider
        .provider()
        .provision(&reg.provision_id)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
}

#[tokio::test]
async fn a_node_joins_through_start_and_ready_and_can_start_again() {
    let w = World::start().await;
    let (_, key) = w.host.provider().await;
    let provider = client_for(&w.host.url, &key);
    let node = StandInNode::start("lifecycle").await;
    let reg = provider
        .provider()
        .register(&RegisterProvisionRequest {
            endpoint: None,
            services: Vec::new(),
            device: serde_json::json!({"gpu": {"memory_mb": 24576}}),
            location: Location::default(),
        })
        .await
        .unwrap();
    assert_eq!((reg.state, reg.tier), (ProvisionState::Registered, 4));
    node.require_secret(reg.node_secret.expose());
    let id = &reg.provision_id;

    let can = StartProvisionRequest {
        services: vec![Service::Chat],
    };
    let start = provider.provider().start(id, &can).await.unwrap();
    assert_eq!(
        (&start.provision_id, start.state, start.tier),
        (id, ProvisionState::Starting, 4)
    );
    assert!(!start.services.is_empty());
    assert!(
        start.services.iter().all(|m| m.service == Service::Chat),
        "{:?}",
        start.services
    );
    assert_eq!(
        provider.provider().provision(id).await.unwrap().state,
        ProvisionState::Starting
    );

    let serving = start.services[..1].to_vec();
    let ready = ReadyProvisionRequest {
        endpoint: node.url(),
        services: serving.clone(),
    };
    let view = provider.provider().ready(id, &ready).await.unwrap();
    assert_eq!(view.state, ProvisionState::Ready);
    assert_eq!(view.services, serving);
    assert_eq!(view.endpoint.as_deref(), Some(node.url().as_str()));
    assert!(view.healthy);
    let req = ChatCompletionRequest::new(serving[0].model.clone(), vec![ChatMessage::user("hi")]);
    let answer = w.client().user().chat(&req).await.unwrap();
    assert_eq!(
        answer.choices[0].message.text().as_deref(),
        Some("Hello from lifecycle")
    );
    provider.provider().heartbeat(id).await.unwrap();

    provider.provider().end(id).await.unwrap();
    assert!(w.client().user().chat(&req).await.is_err());
    // An ended node starts again and comes back.
    provider
        .provider()
        .start(id, &StartProvisionRequest::default())
        .await
        .unwrap();
    provider.provider().ready(id, &ready).await.unwrap();
    w.client().user().chat(&req).await.unwrap();

    // A model outside the catalogue is refused.
    let bogus = ReadyProvisionRequest {
        endpoint: node.url(),
        services: vec![ServedModel {
            service: Service::Chat,
            model: "not-in-catalogue:1b".into(),
        }],
    };
    let e = provider.provider().ready(id, &bogus).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
}

#[tokio::test]
async fn another_providers_node_is_not_found() {
    let w = World::start().await;
    let (_, key) = w.host.provider().await;
    let stranger = client_for(&w.host.url, &key);
    let theirs = w
        .host
        .broker
        .network()
        .provisions(&w.provider)
        .await
        .unwrap();
    let id = &theirs[0].provision_id;
    let ready = ReadyProvisionRequest {
        endpoint: "http://127.0.0.1:9".into(),
        services: Vec::new(),
    };
    for e in [
        stranger.provider().provision(id).await.unwrap_err(),
        stranger
            .provider()
            .start(id, &StartProvisionRequest::default())
            .await
            .unwrap_err(),
        stranger.provider().ready(id, &ready).await.unwrap_err(),
        stranger.provider().heartbeat(id).await.unwrap_err(),
        stranger.provider().end(id).await.unwrap_err(),
        stranger.provider().delete(id).await.unwrap_err(),
    ] {
        assert_eq!(
            (e.status(), e.code()),
            (Some(404), Some("not_found")),
            "{e}"
        );
    }
    assert!(stranger.provider().provisions().await.unwrap().is_empty());
    // The owner's node still serves.
    let req = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")]);
    w.client().user().chat(&req).await.unwrap();
}

#[tokio::test]
async fn ids_are_path_segments_never_paths() {
    let w = World::start().await;
    let (_, key) = w.host.provider().await;
    let provider = client_for(&w.host.url, &key);
    // Each would reach another route if it were pasted into the path.
    for id in ["../../admin/prices", "x?y=1", "a#b", "%2e%2e", "..%2f"] {
        let e = provider
            .provider()
            .heartbeat(&ProvisionId::new(id))
            .await
            .unwrap_err();
        assert_eq!(
            (e.status(), e.code()),
            (Some(404), Some("not_found")),
            "{id}: {e}"
        );
    }
}

#[tokio::test]
async fn a_user_key_is_not_a_provider_key() {
    let w = World::start().await;
    let e = w.client().provider().provisions().await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
}

#[tokio::test]
async fn the_provider_account_its_earnings_and_a_key_rotation() {
    let w = World::start().await;
    let (_, key) = w.host.provider().await;
    let provider = client_for(&w.host.url, &key);
    let node = StandInNode::start("earner").await;
    w.host.offer(Service::Chat, "qwen3:8b").await;
    let reg = provider
        .provider()
        .register(&registration(node.url(), "qwen3:8b"))
        .await
        .unwrap();
    node.require_secret(reg.node_secret.expose());
    let req = ChatCompletionRequest::new("qwen3:8b", vec![ChatMessage::user("hi")]);
    w.client().user().chat(&req).await.unwrap();
    w.client().user().chat(&req).await.unwrap();
    w.host.broker.flush_stats().await.unwrap();

    let account = provider.provider().account().await.unwrap();
    assert_eq!(account.provisions, 1);
    assert_eq!(account.earnings, cxmpute_client::types::Credits(1_000));
    assert!(account.suspended.is_none());

    let earnings = provider.provider().earnings().await.unwrap();
    assert_eq!(earnings.provider_id, account.provider_id);
    assert_eq!(earnings.total, cxmpute_client::types::Credits(1_000));
    assert_eq!(earnings.last_30_days, cxmpute_client::types::Credits(1_000));
    assert_eq!(earnings.days.len(), 30);
    assert_eq!(earnings.days.iter().map(|d| d.requests).sum::<u64>(), 2);

    let nodes = provider.provider().account_provisions().await.unwrap();
    assert_eq!(nodes, provider.provider().provisions().await.unwrap());
    assert_eq!(nodes[0].provision_id, reg.provision_id);

    let rotated = provider.provider().rotate_key().await.unwrap();
    assert_eq!(rotated.provider_id, account.provider_id);
    let e = provider.provider().account().await.unwrap_err();
    assert_eq!(e.status(), Some(401), "the old key stopped working: {e}");
    let provider = provider.with_bearer(rotated.provider_key.expose());
    assert_eq!(
        provider.provider().account().await.unwrap().provider_id,
        account.provider_id
    );
    provider
        .provider()
        .heartbeat(&reg.provision_id)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_signed_in_user_reaches_its_own_provider_account() {
    let w = World::start().await;
    let session = w.sign_in("owner@example.com").await;
    let me = session.account().me().await.unwrap();
    let account = session.provider().account().await.unwrap();
    assert_eq!(Some(account.provider_id.clone()), me.provider_id);
    assert_eq!(account.user_id, Some(me.user_id));
    assert!(session
        .provider()
        .account_provisions()
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        session.provider().earnings().await.unwrap().total,
        cxmpute_client::types::Credits(0)
    );
}
