//! What the cases build their stores from: fixed times, users, keys,
//! providers, nodes, reservations and settlements. The plain builders
//! (times, accounts, keys, providers) are public: a store's own tests build
//! their rows with them too.

use std::sync::Arc;

use serde_json::json;

use crate::secret::Secret;
use crate::store::Store;
use crate::types::*;

pub use crate::fixtures::{new_key, new_user, T0};

/// [`T0`] plus `ms` milliseconds.
pub fn at(ms: i64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

/// A provider account (of `user`, when given) with a random email and
/// nothing earned, created at [`T0`].
pub fn new_provider(user: Option<&User>) -> Provider {
    Provider {
        id: ProviderId::generate(),
        user_id: user.map(|u| u.id.clone()),
        email: format!(
            "{}@providers.test",
            crate::secret::random_token(8).to_lowercase()
        ),
        key_hash: Secret::generate_provider_key().hash(),
        earnings: Credits::ZERO,
        suspended: None,
        created_at: T0,
    }
}

pub(super) fn new_provision(provider: &Provider, created_at: Timestamp) -> Provision {
    Provision {
        id: ProvisionId::generate(),
        provider_id: provider.id.clone(),
        endpoint: None,
        node_secret: Secret::generate(32).expose().to_owned(),
        device: json!({"gpu": {"name": "RTX 4090", "vram_mb": 24576}, "cpu_cores": 16}),
        location: Location {
            country: "DE".into(),
            state: "Berlin".into(),
            city: "Berlin".into(),
        },
        tier: 3,
        state: ProvisionState::Registered,
        last_heartbeat: created_at,
        created_at,
    }
}

pub(super) fn entry(p: &Provision, service: Service, model: &str) -> PoolEntry {
    PoolEntry {
        provision_id: p.id.clone(),
        provider_id: p.provider_id.clone(),
        service,
        model: model.to_owned(),
        endpoint: format!("http://{}.nodes.test", p.id),
        node_secret: p.node_secret.clone(),
        tier: p.tier,
        region: p.location.country.clone(),
    }
}

pub(super) fn reservation(
    user: &User,
    key: &ApiKey,
    amount: Credits,
    created_at: Timestamp,
) -> Reservation {
    Reservation {
        request_id: RequestId::generate(),
        user_id: user.id.clone(),
        key_id: key.id.clone(),
        route: Route::ChatCompletions,
        amount,
        created_at,
    }
}

pub(super) fn usage(
    r: &Reservation,
    provider: Option<&Provider>,
    finished: Timestamp,
) -> UsageRecord {
    UsageRecord {
        request_id: r.request_id.clone(),
        user_id: r.user_id.clone(),
        key_id: r.key_id.clone(),
        route: r.route,
        model: "llama3.2:3b".into(),
        provision_id: provider.map(|_| ProvisionId::new("node_settled")),
        provider_id: provider.map(|p| p.id.clone()),
        input_tokens: 120,
        output_tokens: 345,
        units: 0,
        success: provider.is_some(),
        latency_ms: 812,
        app: Some("conformance".into()),
        at: finished,
        charged: Credits::ZERO,
        reward: Credits::ZERO,
        requested_model: None,
        cache_hit: false,
    }
}

pub(super) fn settlement(
    r: &Reservation,
    charged: Credits,
    reward: Option<(&Provider, Credits)>,
    finished: Timestamp,
) -> Settlement {
    Settlement {
        request_id: r.request_id.clone(),
        charged,
        reward: reward.map(|(p, a)| (p.id.clone(), a)),
        usage: usage(r, reward.map(|(p, _)| p), finished),
    }
}

/// A user with `credits` and one key with `limit`, both stored.
pub(super) async fn funded(
    store: &Arc<dyn Store>,
    credits: Credits,
    limit: Option<Credits>,
) -> (User, ApiKey) {
    let email = format!(
        "{}@users.test",
        crate::secret::random_token(10).to_lowercase()
    );
    let user = new_user(&email, credits);
    store.create_user(&user).await.expect("create user");
    let key = new_key(&user, limit, T0);
    store.create_api_key(&key).await.expect("create key");
    (user, key)
}

pub(super) async fn stored_provider(store: &Arc<dyn Store>) -> Provider {
    let p = new_provider(None);
    store.create_provider(&p).await.expect("create provider");
    p
}

pub(super) async fn balance(store: &Arc<dyn Store>, user: &User) -> Credits {
    store.user(&user.id).await.expect("user").credits
}

pub(super) async fn key_left(store: &Arc<dyn Store>, key: &ApiKey) -> Option<Credits> {
    store
        .api_key_by_hash(&key.hash)
        .await
        .expect("key")
        .credits_left
}

pub(super) async fn earnings(store: &Arc<dyn Store>, p: &Provider) -> Credits {
    store.provider(&p.id).await.expect("provider").earnings
}
