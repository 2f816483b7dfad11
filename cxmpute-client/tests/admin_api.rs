//! The admin API against a real host router on loopback.

mod common;

use common::{client_for, World, MODEL};
use cxmpute_client::types::{
    Credits, NotificationId, Placement, PriceEntry, Service, Timestamp, UserId,
};
use cxmpute_client::wire::{
    ChatCompletionRequest, ChatMessage, CreateProviderRequest, CreateUserRequest,
    GrantCreditsRequest, NotificationRequest, RegisterProvisionRequest, ServedModel,
};
use cxmpute_core::testkit::StandInNode;

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
    assert!(created.api_key.expose().starts_with("cx-"));
    let user = client_for(&w.host.url, &created.api_key.clone());
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
    let provider = w.admin().with_bearer(created.provider_key.expose());
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

#[tokio::test]
async fn search_a_user_see_its_grants_suspend_and_lift() {
    let w = World::start().await;
    let admin = w.admin();
    let created = admin
        .admin()
        .create_user(&CreateUserRequest {
            email: "zed@corp.example".into(),
            credits: Credits::ZERO,
        })
        .await
        .unwrap();
    let grant = GrantCreditsRequest {
        amount: Credits::whole(1),
        reason: "pilot".into(),
    };
    admin
        .admin()
        .grant_credits(&created.user_id, &grant)
        .await
        .unwrap();

    let found = admin.admin().users("corp.example", None).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].user_id.clone(), found[0].credits),
        (created.user_id.clone(), Credits::whole(1))
    );
    assert!(admin.admin().users("", Some(1)).await.unwrap().len() == 1);

    let detail = admin.admin().user(&created.user_id).await.unwrap();
    assert_eq!(detail.user.email, "zed@corp.example");
    assert_eq!(detail.keys.len(), 1);
    assert_eq!(detail.keys[0].key_id, created.key_id);
    let last = detail.grants.last().unwrap();
    assert_eq!(
        (last.amount, last.reason.as_str()),
        (Credits::whole(1), "pilot")
    );

    let user = client_for(&w.host.url, &created.api_key.clone());
    let req = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")]);
    admin
        .admin()
        .suspend_user(&created.user_id, "unpaid invoice")
        .await
        .unwrap();
    let e = user.user().chat(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let suspended = admin
        .admin()
        .user(&created.user_id)
        .await
        .unwrap()
        .user
        .suspended
        .unwrap();
    assert_eq!(suspended.reason, "unpaid invoice");
    admin
        .admin()
        .unsuspend_user(&created.user_id)
        .await
        .unwrap();
    user.user().chat(&req).await.unwrap();

    let e = admin
        .admin()
        .user(&UserId::new("usr_none"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
}

#[tokio::test]
async fn see_a_provider_suspend_it_and_disconnect_its_node() {
    let w = World::start().await;
    let admin = w.admin();
    let req = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")]);
    let p = admin.admin().provider(&w.provider.id).await.unwrap();
    assert_eq!(p.email, w.provider.email);
    assert_eq!(p.provisions.len(), 2);

    let all = admin.admin().provisions().await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|n| n.provider_id == w.provider.id));
    assert!(all
        .iter()
        .any(|n| n.provision.provision_id == w.chat_node_id));

    admin
        .admin()
        .suspend_provider(&w.provider.id, "serving garbage")
        .await
        .unwrap();
    let e = w.client().user().chat(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(503), "its nodes left routing: {e}");
    assert!(admin
        .admin()
        .provider(&w.provider.id)
        .await
        .unwrap()
        .suspended
        .is_some());
    admin
        .admin()
        .unsuspend_provider(&w.provider.id)
        .await
        .unwrap();
    assert!(admin
        .admin()
        .provider(&w.provider.id)
        .await
        .unwrap()
        .suspended
        .is_none());

    // Back in routing after the suspension is lifted, then disconnected for good.
    let (_other, _, spare) = w.host.stand_in("spare", Service::Chat, MODEL).await;
    admin.admin().disconnect(&w.chat_node_id).await.unwrap();
    admin.admin().disconnect(&spare).await.unwrap();
    let e = w.client().user().chat(&req).await.unwrap_err();
    assert!(matches!(e.status(), Some(404) | Some(503)), "{e}");
    let left: Vec<_> = admin.admin().provisions().await.unwrap();
    assert!(left
        .iter()
        .all(|n| n.provision.provision_id != w.chat_node_id));
}

#[tokio::test]
async fn notifications_are_created_listed_replaced_and_deleted() {
    let w = World::start().await;
    let admin = w.admin();
    let now = w.host.broker.now().millis();
    let mut req = NotificationRequest {
        title: "Welcome".into(),
        banner: "New models".into(),
        popup: "Try them".into(),
        starts_at: Timestamp(now),
        ends_at: Timestamp(now + 86_400_000),
        placements: vec![Placement::Homepage],
    };
    let n = admin.admin().create_notification(&req).await.unwrap();
    assert_eq!(
        (n.title.as_str(), n.placements.clone()),
        ("Welcome", vec![Placement::Homepage])
    );
    assert_eq!(
        admin.admin().notifications().await.unwrap(),
        vec![n.clone()]
    );

    req.title = "Welcome back".into();
    let replaced = admin
        .admin()
        .replace_notification(&n.id, &req)
        .await
        .unwrap();
    assert_eq!(
        (replaced.id.clone(), replaced.title.as_str()),
        (n.id.clone(), "Welcome back")
    );

    admin.admin().delete_notification(&n.id).await.unwrap();
    assert!(admin.admin().notifications().await.unwrap().is_empty());
    let e = admin
        .admin()
        .replace_notification(&NotificationId::new("ntf_none"), &req)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    req.placements.clear();
    let e = admin.admin().create_notification(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
}

#[tokio::test]
async fn an_admin_session_works_like_an_admin_key() {
    let w = World::start().await;
    let admin_user = w
        .host
        .broker
        .store()
        .user_by_email("admin@cxmpute.test")
        .await
        .unwrap();
    let tokens = w
        .host
        .broker
        .sessions()
        .start_session(&admin_user)
        .await
        .unwrap();
    let session = w
        .anonymous()
        .with_session(tokens.to_response(w.host.broker.now()));
    assert!(session.account().me().await.unwrap().is_admin);
    assert!(!session.admin().prices().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_catalogue_round_trips_and_reaches_routing() {
    use cxmpute_client::types::CatalogueModel;
    let w = World::start().await;
    let admin = w.admin();
    let before = admin.admin().catalogue().await.unwrap();
    assert!(before.iter().any(|m| m.model == MODEL));

    // Added: listed to the admin and to anyone, with its price.
    let entry = CatalogueModel::new(Service::Chat, "org/tiny:0.5b", 1, 2);
    let change = admin.admin().put_catalogue_model(&entry).await.unwrap();
    assert_eq!(
        (change.entry.as_ref(), change.removed_nodes),
        (Some(&entry), 0)
    );
    let after = admin.admin().catalogue().await.unwrap();
    assert_eq!(after.len(), before.len() + 1);
    assert!(after.contains(&entry));
    let public = w.client().anonymous().user().catalogue().await.unwrap();
    let offer = public.data.iter().find(|o| o.model == entry.model).unwrap();
    assert_eq!((offer.min_tier, offer.target_nodes, offer.nodes), (1, 2, 0));
    assert_eq!(offer.price.per_request, Credits(1_000));

    // A node serves it, a user calls it.
    let node = StandInNode::start("tiny").await;
    let id = w
        .host
        .add_node(&w.provider, &node, Service::Chat, &entry.model)
        .await;
    let req = ChatCompletionRequest::new(&entry.model, vec![ChatMessage::user("hi")]);
    w.client().user().chat(&req).await.unwrap();

    // Removed (the slash in its name goes percent-encoded): the node leaves.
    let gone = admin
        .admin()
        .delete_catalogue_model(Service::Chat, &entry.model)
        .await
        .unwrap();
    assert_eq!((gone.entry, gone.removed_nodes), (None, 1));
    assert!(!w.host.is_routable(&id));
    let e = w.client().user().chat(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = admin
        .admin()
        .delete_catalogue_model(Service::Chat, &entry.model)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    // Refusals come back as errors with the host's words.
    let bad = CatalogueModel::new(Service::Chat, "x", 9, 1);
    let e = admin.admin().put_catalogue_model(&bad).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("min_tier must be 1-4"), "{e}");
    let e = w.client().admin().catalogue().await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // The reward policy: this world pays a flat reward.
    let policy = admin.admin().reward_policy().await.unwrap();
    assert_eq!(policy.policy, "flat");
    assert!(policy.platform_share_permille.is_empty());
    w.host.assert_ledger().await;
}

#[tokio::test]
async fn aliases_round_trip_and_a_call_falls_back_through_one() {
    use cxmpute_client::types::ModelAlias;
    let w = World::start().await;
    let admin = w.admin();
    assert!(admin.admin().aliases().await.unwrap().is_empty());
    // `llama3.2:1b` has no node here: the alias falls back to MODEL.
    let fast = ModelAlias {
        alias: "fast/one".into(),
        models: vec!["llama3.2:1b".into(), MODEL.into()],
    };
    assert_eq!(admin.admin().put_alias(&fast).await.unwrap(), fast);
    assert_eq!(admin.admin().aliases().await.unwrap(), vec![fast.clone()]);
    let public = w.client().anonymous().user().catalogue().await.unwrap();
    assert_eq!(public.aliases, vec![fast.clone()]);
    let models = w.client().anonymous().user().models().await.unwrap();
    let listed = models.data.iter().find(|m| m.id == fast.alias).unwrap();
    assert_eq!(
        (listed.owned_by.as_str(), &listed.models),
        ("cxmpute-alias", &fast.models)
    );

    let req = ChatCompletionRequest::new(&fast.alias, vec![ChatMessage::user("hi")]);
    let answer = w.client().user().chat(&req).await.unwrap();
    assert_eq!(answer.model, MODEL);
    // The request type carries a fallback list as OpenRouter's does.
    let mut req = ChatCompletionRequest::new("", vec![ChatMessage::user("hi")]);
    req.models = vec!["llama3.2:1b".into(), MODEL.into()];
    assert_eq!(w.client().user().chat(&req).await.unwrap().model, MODEL);

    // The slash in its name goes percent-encoded.
    admin.admin().delete_alias(&fast.alias).await.unwrap();
    let e = admin.admin().delete_alias(&fast.alias).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let bad = ModelAlias {
        alias: MODEL.into(),
        models: vec!["llama3.2:1b".into()],
    };
    let e = admin.admin().put_alias(&bad).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let e = w.client().admin().aliases().await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    w.host.assert_ledger().await;
}

#[tokio::test]
async fn an_admin_sets_a_keys_rate_limits_and_a_call_over_them_is_a_429_with_retry_after() {
    use cxmpute_client::types::ApiKeyId;
    use cxmpute_client::wire::UpdateKeyRequest;

    let w = World::start().await;
    let key_id: ApiKeyId = w.host.broker.store().api_keys(&w.user.id).await.unwrap()[0]
        .id
        .clone();
    let limits = UpdateKeyRequest {
        rpm: Some(Some(1)),
        tpm: Some(Some(100_000)),
        ..Default::default()
    };
    let view = w
        .admin()
        .admin()
        .update_key(&key_id, &limits)
        .await
        .unwrap();
    assert_eq!((view.rpm, view.tpm), (Some(1), Some(100_000)));

    let user = w.client();
    let req = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")]);
    user.user().chat(&req).await.unwrap();
    let e = user.user().chat(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(429), "{e}");
    assert_eq!(e.code(), Some("rate_limit_exceeded"));
    // The host's clock stands at the start of a minute: the whole minute.
    assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(60)));
    assert_eq!(w.chat_node.hits(), 1, "the refused call went nowhere");

    // A user's key cannot change another's through the admin API, and a
    // bad value is refused with the broker's words.
    let e = user.admin().update_key(&key_id, &limits).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let zero = UpdateKeyRequest {
        rpm: Some(Some(0)),
        ..Default::default()
    };
    let e = w
        .admin()
        .admin()
        .update_key(&key_id, &zero)
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("invalid_request")));

    // `Some(None)` removes the limit: the next call goes through.
    let lift = UpdateKeyRequest {
        rpm: Some(None),
        ..Default::default()
    };
    let view = w.admin().admin().update_key(&key_id, &lift).await.unwrap();
    assert_eq!((view.rpm, view.tpm), (None, Some(100_000)));
    user.user().chat(&req).await.unwrap();
    w.host.assert_ledger().await;
}
