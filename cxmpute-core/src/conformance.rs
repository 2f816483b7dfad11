//! The store conformance suite: what every [`Store`] must do, as async
//! functions over `Arc<dyn Store>`, and
//! [`store_conformance_tests!`](crate::store_conformance_tests) to stamp them
//! into `#[tokio::test]`s.
//!
//! ```ignore
//! // tests/conformance.rs of a store crate (needs tokio with `macros` and
//! // `rt-multi-thread` among its dev-dependencies):
//! async fn fresh() -> std::sync::Arc<dyn cxmpute_core::Store> {
//!     std::sync::Arc::new(cxmpute_core::MemoryStore::new())
//! }
//! cxmpute_core::store_conformance_tests!(fresh);
//! ```
//!
//! The factory is called once per test and must hand out an empty store. It
//! may instead return `(Arc<dyn Store>, guard)`: the guard (a temporary
//! directory, a server handle) lives until the test ends. See [`TestStore`].
//!
//! Every case uses fixed [`Timestamp`]s and amounts: nothing sleeps or reads
//! the wall clock, so a failure is the store's, never the machine's.

use std::any::Any;
use std::sync::Arc;

use serde_json::json;

use crate::error::Error;
use crate::secret::{KeyHash, Secret};
use crate::store::Store;
use crate::types::*;

/// What a conformance factory may return: a store, or a store with a guard
/// that must outlive it (a temporary directory holding its files).
pub trait TestStore {
    /// The store, and whatever must stay alive while it is used.
    fn into_parts(self) -> (Arc<dyn Store>, Box<dyn Any>);
}

impl TestStore for Arc<dyn Store> {
    fn into_parts(self) -> (Arc<dyn Store>, Box<dyn Any>) {
        (self, Box::new(()))
    }
}

impl<G: Any> TestStore for (Arc<dyn Store>, G) {
    fn into_parts(self) -> (Arc<dyn Store>, Box<dyn Any>) {
        (self.0, Box::new(self.1))
    }
}

/// Stamps every conformance case into a `#[tokio::test]` (multi-threaded, 4
/// workers) that calls `$factory().await` for a fresh store.
///
/// The calling crate needs `tokio` (features `macros`, `rt-multi-thread`).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::__store_conformance_cases!(
            $factory;
            create_user_is_create_if_absent,
            users_round_trip_and_resolve_by_email,
            missing_things_are_not_found,
            search_users_is_case_insensitive_sorted_and_limited,
            set_user_suspended_round_trips,
            grant_credits_adds_and_records,
            negative_grant_below_zero_fails_and_changes_nothing,
            create_api_key_is_create_if_absent,
            api_key_hash_resolves_to_its_user,
            update_api_key_moves_limit_and_changes_fields,
            revoke_api_key_is_permanent,
            create_provider_is_create_if_absent,
            rotate_provider_key_retires_old_hash_at_once,
            set_provider_suspended_round_trips,
            provisions_and_pool_entries_appear_together,
            update_provision_replaces_state_endpoint_and_entries,
            delete_provision_removes_its_entries,
            heartbeat_never_moves_backwards,
            expire_provisions_ends_silent_nodes,
            reserve_holds_balance_and_key_limit,
            reserve_insufficient_credits_changes_nothing,
            reserve_key_limit_changes_nothing,
            reserve_rejects_unknown_revoked_and_foreign_keys,
            reserve_rejects_suspended_users_and_unpermitted_routes,
            reserve_same_request_twice_is_already_exists,
            settle_charges_reserved_min_and_releases_rest,
            settle_clamps_charge_and_reward,
            settle_records_usage_under_the_reservations_user_and_key,
            failed_request_costs_nothing,
            settle_twice_has_effect_once,
            settle_unknown_request_is_not_found,
            settle_refund_never_lifts_key_above_its_limit,
            release_stale_reservations_releases_only_old_ones,
            ledger_totals_add_up,
            usage_records_newest_first_per_user,
            put_price_replaces_same_service_and_model,
            login_code_is_single_use,
            login_code_expires,
            login_code_attempts_are_limited,
            login_code_reissue_replaces_and_resets_attempts,
            login_codes_are_rate_limited_per_window,
            old_login_codes_are_pruned,
            refresh_token_rotates,
            refresh_token_reuse_revokes_family,
            refresh_token_expiry_and_revocation,
            expired_refresh_tokens_are_pruned,
            notifications_put_replace_delete,
            record_stats_is_idempotent_per_batch,
            stats_over_day_range,
            stats_by_prefix_sums_scopes,
            concurrent_reservations_never_overdraw,
            concurrent_reservations_respect_key_limit,
            concurrent_settles_lose_no_update,
            concurrent_duplicate_settles_apply_once,
        );
    };
}

/// Implementation detail of [`store_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_cases {
    ($factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, guard) =
                    $crate::conformance::TestStore::into_parts(($factory)().await);
                $crate::conformance::$case(store).await;
                drop(guard);
            }
        )*
    };
}

// ---- fixtures ----------------------------------------------------------------

/// 2026-01-01T00:00:00Z: every case's "now" is counted from here.
const T0: Timestamp = Timestamp(1_767_225_600_000);

fn at(ms: i64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

/// Asserts that a result is the error variant given, printing what it was otherwise.
macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!(
                "expected Err({}), got {:?} at {}:{}",
                stringify!($pat),
                other,
                file!(),
                line!()
            ),
        }
    };
}

fn new_user(email: &str, credits: Credits) -> User {
    User {
        id: UserId::generate(),
        email: email.to_owned(),
        credits,
        is_admin: false,
        suspended: None,
        created_at: T0,
    }
}

fn new_key(user: &User, limit: Option<Credits>, created_at: Timestamp) -> ApiKey {
    let secret = Secret::generate_api_key();
    ApiKey {
        id: ApiKeyId::generate(),
        user_id: user.id.clone(),
        hash: secret.hash(),
        name: "default".into(),
        prefix: secret.display_prefix(),
        credit_limit: limit,
        credits_left: limit,
        permitted_routes: Vec::new(),
        created_at,
        last_used_at: None,
        revoked_at: None,
    }
}

fn new_provider(user: Option<&User>) -> Provider {
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

fn new_provision(provider: &Provider, created_at: Timestamp) -> Provision {
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

fn entry(p: &Provision, service: Service, model: &str) -> PoolEntry {
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

fn reservation(user: &User, key: &ApiKey, amount: Credits, created_at: Timestamp) -> Reservation {
    Reservation {
        request_id: RequestId::generate(),
        user_id: user.id.clone(),
        key_id: key.id.clone(),
        route: Route::ChatCompletions,
        amount,
        created_at,
    }
}

fn usage(r: &Reservation, provider: Option<&Provider>, finished: Timestamp) -> UsageRecord {
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
    }
}

fn settlement(
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
async fn funded(
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

async fn stored_provider(store: &Arc<dyn Store>) -> Provider {
    let p = new_provider(None);
    store.create_provider(&p).await.expect("create provider");
    p
}

async fn balance(store: &Arc<dyn Store>, user: &User) -> Credits {
    store.user(&user.id).await.expect("user").credits
}

async fn key_left(store: &Arc<dyn Store>, key: &ApiKey) -> Option<Credits> {
    store
        .api_key_by_hash(&key.hash)
        .await
        .expect("key")
        .credits_left
}

async fn earnings(store: &Arc<dyn Store>, p: &Provider) -> Credits {
    store.provider(&p.id).await.expect("provider").earnings
}

fn sorted_entries(mut v: Vec<PoolEntry>) -> Vec<PoolEntry> {
    v.sort_by(|a, b| {
        (&a.provision_id, a.service, &a.model).cmp(&(&b.provision_id, b.service, &b.model))
    });
    v
}

fn counters(requests: u64, charged: i64, buckets: Vec<u64>) -> StatsCounters {
    StatsCounters {
        requests,
        failures: requests / 4,
        input_tokens: requests * 10,
        output_tokens: requests * 20,
        units: requests * 3,
        latency_ms_sum: requests * 100,
        latency_buckets: buckets,
        charged,
        rewarded: charged / 2,
    }
}

// ---- users -------------------------------------------------------------------

/// A second user with the same id or email is `AlreadyExists` and changes nothing.
pub async fn create_user_is_create_if_absent(store: Arc<dyn Store>) {
    let alice = new_user("alice@example.com", Credits::whole(5));
    store.create_user(&alice).await.unwrap();

    let mut same_id = new_user("other@example.com", Credits::whole(99));
    same_id.id = alice.id.clone();
    assert_err!(store.create_user(&same_id).await, Error::AlreadyExists(_));
    assert_err!(
        store.user_by_email("other@example.com").await,
        Error::NotFound(_)
    );

    let same_email = new_user("alice@example.com", Credits::whole(99));
    assert_err!(
        store.create_user(&same_email).await,
        Error::AlreadyExists(_)
    );
    assert_err!(store.user(&same_email.id).await, Error::NotFound(_));

    assert_eq!(store.user(&alice.id).await.unwrap(), alice);
}

/// Users come back exactly as stored, by id and by email.
pub async fn users_round_trip_and_resolve_by_email(store: Arc<dyn Store>) {
    let mut admin = new_user("root@example.com", Credits::micros(1_234_567));
    admin.is_admin = true;
    admin.created_at = at(42);
    admin.suspended = Some(Suspension {
        reason: "chargeback".into(),
        by: "system".into(),
        at: at(43),
    });
    store.create_user(&admin).await.unwrap();
    let plain = new_user("plain@example.com", Credits::ZERO);
    store.create_user(&plain).await.unwrap();

    assert_eq!(store.user(&admin.id).await.unwrap(), admin);
    assert_eq!(
        store.user_by_email("root@example.com").await.unwrap(),
        admin
    );
    assert_eq!(
        store.user_by_email("plain@example.com").await.unwrap(),
        plain
    );
}

/// Every lookup or change of something that does not exist is `NotFound`.
pub async fn missing_things_are_not_found(store: Arc<dyn Store>) {
    let ghost_user = new_user("ghost@example.com", Credits::whole(1));
    let ghost_provider = new_provider(None);
    let ghost_node = new_provision(&ghost_provider, T0);

    assert_err!(store.user(&ghost_user.id).await, Error::NotFound(_));
    assert_err!(
        store.user_by_email("ghost@example.com").await,
        Error::NotFound(_)
    );
    assert_err!(
        store.set_user_suspended(&ghost_user.id, None).await,
        Error::NotFound(_)
    );
    let grant = CreditGrant {
        user_id: ghost_user.id.clone(),
        amount: Credits::whole(1),
        by: "admin".into(),
        reason: "test".into(),
        at: T0,
    };
    assert_err!(store.grant_credits(&grant).await, Error::NotFound(_));

    let key = new_key(&ghost_user, None, T0);
    assert_err!(store.create_api_key(&key).await, Error::NotFound(_));
    assert_err!(store.api_key_by_hash(&key.hash).await, Error::NotFound(_));
    assert_err!(
        store
            .update_api_key(&key.id, &ApiKeyUpdate::default())
            .await,
        Error::NotFound(_)
    );
    assert_err!(store.revoke_api_key(&key.id, T0).await, Error::NotFound(_));

    assert_err!(store.provider(&ghost_provider.id).await, Error::NotFound(_));
    assert_err!(
        store.provider_by_key_hash(&ghost_provider.key_hash).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.provider_by_user(&ghost_user.id).await,
        Error::NotFound(_)
    );
    assert_err!(
        store
            .rotate_provider_key(&ghost_provider.id, &KeyHash::of("fresh"))
            .await,
        Error::NotFound(_)
    );
    assert_err!(
        store.set_provider_suspended(&ghost_provider.id, None).await,
        Error::NotFound(_)
    );

    assert_err!(
        store
            .create_provision(&ghost_node, &[entry(&ghost_node, Service::Chat, "m")])
            .await,
        Error::NotFound(_)
    );
    assert!(store.pool_entries().await.unwrap().is_empty());
    assert_err!(store.provision(&ghost_node.id).await, Error::NotFound(_));
    assert_err!(
        store
            .update_provision(&ghost_node.id, ProvisionState::Ready, None, &[])
            .await,
        Error::NotFound(_)
    );
    assert_err!(
        store.heartbeat(&ghost_node.id, T0).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.delete_provision(&ghost_node.id).await,
        Error::NotFound(_)
    );

    assert_err!(
        store.settlement(&RequestId::generate()).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.refresh_token_family(&KeyHash::of("nope")).await,
        Error::NotFound(_)
    );
    assert_err!(
        store.delete_notification(&NotificationId::generate()).await,
        Error::NotFound(_)
    );
}

/// `search_users` matches a substring of the email whatever its case, sorted
/// by email, at most `limit`.
pub async fn search_users_is_case_insensitive_sorted_and_limited(store: Arc<dyn Store>) {
    for email in [
        "bob@example.com",
        "alicia@other.org",
        "alice@example.com",
        "carol@example.com",
    ] {
        store
            .create_user(&new_user(email, Credits::ZERO))
            .await
            .unwrap();
    }
    let emails = |v: Vec<User>| v.into_iter().map(|u| u.email).collect::<Vec<_>>();

    assert_eq!(
        emails(store.search_users("ALI", 10).await.unwrap()),
        ["alice@example.com", "alicia@other.org"]
    );
    assert_eq!(
        emails(store.search_users("example", 2).await.unwrap()),
        ["alice@example.com", "bob@example.com"]
    );
    assert_eq!(store.search_users("", 10).await.unwrap().len(), 4);
    assert!(store.search_users("zed", 10).await.unwrap().is_empty());
    assert!(store.search_users("ali", 0).await.unwrap().is_empty());
}

/// Suspending and unsuspending a user is stored as given.
pub async fn set_user_suspended_round_trips(store: Arc<dyn Store>) {
    let u = new_user("sus@example.com", Credits::ZERO);
    store.create_user(&u).await.unwrap();
    let s = Suspension {
        reason: "abuse".into(),
        by: "usr_admin".into(),
        at: at(5),
    };
    store
        .set_user_suspended(&u.id, Some(s.clone()))
        .await
        .unwrap();
    assert_eq!(store.user(&u.id).await.unwrap().suspended, Some(s));
    store.set_user_suspended(&u.id, None).await.unwrap();
    assert_eq!(store.user(&u.id).await.unwrap(), u);
}

/// Grants add to the balance, return it, and are recorded oldest first per user.
pub async fn grant_credits_adds_and_records(store: Arc<dyn Store>) {
    let a = new_user("a@example.com", Credits::whole(1));
    let b = new_user("b@example.com", Credits::ZERO);
    store.create_user(&a).await.unwrap();
    store.create_user(&b).await.unwrap();
    let grant = |u: &User, amount: Credits, ms: i64| CreditGrant {
        user_id: u.id.clone(),
        amount,
        by: "usr_admin".into(),
        reason: format!("grant at {ms}"),
        at: at(ms),
    };
    let g1 = grant(&a, Credits::micros(2_500_000), 1);
    let g2 = grant(&b, Credits::whole(7), 2);
    let g3 = grant(&a, Credits::micros(-3_500_000), 3);

    assert_eq!(
        store.grant_credits(&g1).await.unwrap(),
        Credits::micros(3_500_000)
    );
    assert_eq!(store.grant_credits(&g2).await.unwrap(), Credits::whole(7));
    // Down to exactly zero is allowed.
    assert_eq!(store.grant_credits(&g3).await.unwrap(), Credits::ZERO);

    assert_eq!(balance(&store, &a).await, Credits::ZERO);
    assert_eq!(balance(&store, &b).await, Credits::whole(7));
    assert_eq!(store.credit_grants(&a.id).await.unwrap(), vec![g1, g3]);
    assert_eq!(store.credit_grants(&b.id).await.unwrap(), vec![g2]);
}

/// Removing more than the balance is `InsufficientCredits`, leaves the
/// balance alone and records no grant.
pub async fn negative_grant_below_zero_fails_and_changes_nothing(store: Arc<dyn Store>) {
    let u = new_user("poor@example.com", Credits::whole(3));
    store.create_user(&u).await.unwrap();
    let take = CreditGrant {
        user_id: u.id.clone(),
        amount: Credits::micros(-3_000_001),
        by: "usr_admin".into(),
        reason: "refund".into(),
        at: T0,
    };
    assert_err!(
        store.grant_credits(&take).await,
        Error::InsufficientCredits(_)
    );
    assert_eq!(balance(&store, &u).await, Credits::whole(3));
    assert!(store.credit_grants(&u.id).await.unwrap().is_empty());
}

// ---- API keys ------------------------------------------------------------------

/// A second key with the same id or hash is `AlreadyExists` and changes nothing.
pub async fn create_api_key_is_create_if_absent(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(1), None).await;

    let mut same_id = new_key(&user, Some(Credits::whole(5)), at(1));
    same_id.id = key.id.clone();
    assert_err!(
        store.create_api_key(&same_id).await,
        Error::AlreadyExists(_)
    );
    assert_err!(
        store.api_key_by_hash(&same_id.hash).await,
        Error::NotFound(_)
    );

    let mut same_hash = new_key(&user, Some(Credits::whole(5)), at(1));
    same_hash.hash = key.hash;
    assert_err!(
        store.create_api_key(&same_hash).await,
        Error::AlreadyExists(_)
    );

    assert_eq!(store.api_keys(&user.id).await.unwrap(), vec![key]);
}

/// A key's hash resolves to the key (and so its user); a user's keys are
/// listed oldest first and nobody else's.
pub async fn api_key_hash_resolves_to_its_user(store: Arc<dyn Store>) {
    let (alice, k1) = funded(&store, Credits::whole(1), None).await;
    let (bob, bob_key) = funded(&store, Credits::whole(1), None).await;
    let mut k2 = new_key(&alice, Some(Credits::micros(1_500_000)), at(10));
    k2.name = "ci".into();
    k2.permitted_routes = vec![Route::Embeddings, Route::ChatCompletions];
    let k3 = new_key(&alice, None, at(5));
    store.create_api_key(&k2).await.unwrap();
    store.create_api_key(&k3).await.unwrap();

    let got = store.api_key_by_hash(&k2.hash).await.unwrap();
    assert_eq!(got, k2);
    assert_eq!(got.user_id, alice.id);
    assert_eq!(
        store.api_key_by_hash(&bob_key.hash).await.unwrap().user_id,
        bob.id
    );
    assert_eq!(
        store.api_keys(&alice.id).await.unwrap(),
        vec![k1, k3, k2],
        "oldest first"
    );
    assert_eq!(store.api_keys(&bob.id).await.unwrap(), vec![bob_key]);
}

/// `update_api_key` renames, re-routes, and moves `credits_left` with the limit.
pub async fn update_api_key_moves_limit_and_changes_fields(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(100), Some(Credits::whole(10))).await;
    let r = reservation(&user, &key, Credits::whole(4), at(1));
    store.reserve(&r).await.unwrap();
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(6)));

    let update = |limit: Option<Option<Credits>>| ApiKeyUpdate {
        name: None,
        credit_limit: limit,
        permitted_routes: None,
    };
    // Raising the limit by 10 raises what is left by 10.
    let k = store
        .update_api_key(&key.id, &update(Some(Some(Credits::whole(20)))))
        .await
        .unwrap();
    assert_eq!(k.credit_limit, Some(Credits::whole(20)));
    assert_eq!(k.credits_left, Some(Credits::whole(16)));
    // Lowering it below what is spent leaves nothing, never a negative.
    let k = store
        .update_api_key(&key.id, &update(Some(Some(Credits::whole(3)))))
        .await
        .unwrap();
    assert_eq!(k.credits_left, Some(Credits::ZERO));
    assert_err!(
        store
            .reserve(&reservation(&user, &key, Credits::micros(1), at(2)))
            .await,
        Error::KeyLimitReached(_)
    );
    // Removing the limit: only the balance limits the key.
    let k = store
        .update_api_key(&key.id, &update(Some(None)))
        .await
        .unwrap();
    assert_eq!((k.credit_limit, k.credits_left), (None, None));
    store
        .reserve(&reservation(&user, &key, Credits::whole(50), at(3)))
        .await
        .unwrap();

    // Name and routes; `None` fields stay as they are.
    let k = store
        .update_api_key(
            &key.id,
            &ApiKeyUpdate {
                name: Some("renamed".into()),
                credit_limit: None,
                permitted_routes: Some(vec![Route::Embeddings]),
            },
        )
        .await
        .unwrap();
    assert_eq!(k.name, "renamed");
    assert_eq!(k.permitted_routes, vec![Route::Embeddings]);
    assert_eq!((k.credit_limit, k.credits_left), (None, None));
    assert_eq!(k.last_used_at, Some(at(3)));
    assert_eq!(store.api_key_by_hash(&key.hash).await.unwrap(), k);
    assert_err!(
        store
            .reserve(&reservation(&user, &key, Credits::micros(1), at(4)))
            .await,
        Error::Forbidden(_)
    );
}

/// A revoked key stays revoked (at its first revocation time) and reserves nothing.
pub async fn revoke_api_key_is_permanent(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    store.revoke_api_key(&key.id, at(7)).await.unwrap();
    store.revoke_api_key(&key.id, at(9)).await.unwrap();
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.revoked_at, Some(at(7)));
    assert_err!(
        store
            .reserve(&reservation(&user, &key, Credits::whole(1), at(10)))
            .await,
        Error::Unauthorized(_)
    );
    assert_eq!(balance(&store, &user).await, Credits::whole(10));
}

// ---- providers -----------------------------------------------------------------

/// A second provider with the same id, key hash or user is `AlreadyExists`;
/// providers resolve by id, key hash and user.
pub async fn create_provider_is_create_if_absent(store: Arc<dyn Store>) {
    let (user, _) = funded(&store, Credits::ZERO, None).await;
    let p = new_provider(Some(&user));
    store.create_provider(&p).await.unwrap();

    let mut same_id = new_provider(None);
    same_id.id = p.id.clone();
    assert_err!(
        store.create_provider(&same_id).await,
        Error::AlreadyExists(_)
    );
    let mut same_hash = new_provider(None);
    same_hash.key_hash = p.key_hash;
    assert_err!(
        store.create_provider(&same_hash).await,
        Error::AlreadyExists(_)
    );
    assert_err!(store.provider(&same_hash.id).await, Error::NotFound(_));
    let same_user = new_provider(Some(&user));
    assert_err!(
        store.create_provider(&same_user).await,
        Error::AlreadyExists(_)
    );

    assert_eq!(store.provider(&p.id).await.unwrap(), p);
    assert_eq!(store.provider_by_key_hash(&p.key_hash).await.unwrap(), p);
    assert_eq!(store.provider_by_user(&user.id).await.unwrap(), p);
    // Providers without a user account do not collide with each other.
    store.create_provider(&new_provider(None)).await.unwrap();
    store.create_provider(&new_provider(None)).await.unwrap();
}

/// After a rotation the old hash is `NotFound` at once; a hash in use is refused.
pub async fn rotate_provider_key_retires_old_hash_at_once(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let other = stored_provider(&store).await;
    let fresh = Secret::generate_provider_key().hash();
    store.rotate_provider_key(&p.id, &fresh).await.unwrap();

    assert_err!(
        store.provider_by_key_hash(&p.key_hash).await,
        Error::NotFound(_)
    );
    let got = store.provider_by_key_hash(&fresh).await.unwrap();
    assert_eq!(got.id, p.id);
    assert_eq!(got.key_hash, fresh);

    assert_err!(
        store.rotate_provider_key(&p.id, &other.key_hash).await,
        Error::AlreadyExists(_)
    );
    assert_eq!(store.provider(&p.id).await.unwrap().key_hash, fresh);
    assert_eq!(
        store
            .provider_by_key_hash(&other.key_hash)
            .await
            .unwrap()
            .id,
        other.id
    );
}

/// Suspending and unsuspending a provider is stored as given.
pub async fn set_provider_suspended_round_trips(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let s = Suspension {
        reason: "bad answers".into(),
        by: "system".into(),
        at: at(3),
    };
    store
        .set_provider_suspended(&p.id, Some(s.clone()))
        .await
        .unwrap();
    assert_eq!(store.provider(&p.id).await.unwrap().suspended, Some(s));
    store.set_provider_suspended(&p.id, None).await.unwrap();
    assert_eq!(store.provider(&p.id).await.unwrap(), p);
}

// ---- provisions and pools --------------------------------------------------------

/// A provision and its pool entries are stored together and listed by
/// provider (oldest first) and in the live listing.
pub async fn provisions_and_pool_entries_appear_together(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let q = stored_provider(&store).await;
    let n1 = new_provision(&p, at(20));
    let mut n2 = new_provision(&p, at(10));
    n2.endpoint = Some("http://n2.nodes.test".into());
    n2.state = ProvisionState::Ready;
    let n3 = new_provision(&q, at(15));
    let e2 = vec![
        entry(&n2, Service::Chat, "llama3.2:3b"),
        entry(&n2, Service::Embeddings, "nomic-embed-text"),
    ];
    let e3 = vec![entry(&n3, Service::Chat, "llama3.2:3b")];
    store.create_provision(&n1, &[]).await.unwrap();
    store.create_provision(&n2, &e2).await.unwrap();
    store.create_provision(&n3, &e3).await.unwrap();

    assert_err!(
        store
            .create_provision(&n1, &[entry(&n1, Service::Tts, "kokoro")])
            .await,
        Error::AlreadyExists(_)
    );
    assert_eq!(store.provision(&n2.id).await.unwrap(), n2);
    assert_eq!(
        store.provisions_by_provider(&p.id).await.unwrap(),
        vec![n2.clone(), n1.clone()]
    );
    assert_eq!(
        store.provisions_by_provider(&q.id).await.unwrap(),
        vec![n3.clone()]
    );
    assert_eq!(
        store.provisions().await.unwrap(),
        vec![n2.clone(), n3.clone(), n1.clone()]
    );
    let mut all = e2.clone();
    all.extend(e3.clone());
    assert_eq!(
        sorted_entries(store.pool_entries().await.unwrap()),
        sorted_entries(all)
    );
}

/// `update_provision` replaces state, endpoint and entries in one step; an
/// ended node takes no entries and leaves the live listing.
pub async fn update_provision_replaces_state_endpoint_and_entries(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let n = new_provision(&p, at(1));
    let other = new_provision(&p, at(2));
    let other_entries = vec![entry(&other, Service::Chat, "qwen")];
    store
        .create_provision(&n, &[entry(&n, Service::Tts, "kokoro")])
        .await
        .unwrap();
    store
        .create_provision(&other, &other_entries)
        .await
        .unwrap();

    let ready = vec![
        entry(&n, Service::Chat, "llama3.2:3b"),
        entry(&n, Service::Vision, "moondream"),
    ];
    let endpoint = Some("http://n.nodes.test:8080".to_owned());
    store
        .update_provision(&n.id, ProvisionState::Ready, endpoint.clone(), &ready)
        .await
        .unwrap();
    let got = store.provision(&n.id).await.unwrap();
    assert_eq!(got.state, ProvisionState::Ready);
    assert_eq!(got.endpoint, endpoint);
    let mut want = ready.clone();
    want.extend(other_entries.clone());
    assert_eq!(
        sorted_entries(store.pool_entries().await.unwrap()),
        sorted_entries(want.clone())
    );

    assert_err!(
        store
            .update_provision(&n.id, ProvisionState::Ended, None, &ready)
            .await,
        Error::InvalidInput(_)
    );
    assert_eq!(store.provision(&n.id).await.unwrap(), got, "unchanged");
    assert_eq!(
        sorted_entries(store.pool_entries().await.unwrap()),
        sorted_entries(want)
    );

    store
        .update_provision(&n.id, ProvisionState::Ended, None, &[])
        .await
        .unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().state,
        ProvisionState::Ended
    );
    assert_eq!(store.pool_entries().await.unwrap(), other_entries);
    assert_eq!(store.provisions().await.unwrap(), vec![other]);
    assert_eq!(store.provisions_by_provider(&p.id).await.unwrap().len(), 2);
}

/// Deleting a node deletes its entries; a second delete is `NotFound`.
pub async fn delete_provision_removes_its_entries(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let n = new_provision(&p, at(1));
    let keep = new_provision(&p, at(2));
    let keep_entries = vec![entry(&keep, Service::Scrape, "default")];
    store
        .create_provision(
            &n,
            &[entry(&n, Service::Chat, "a"), entry(&n, Service::Chat, "b")],
        )
        .await
        .unwrap();
    store.create_provision(&keep, &keep_entries).await.unwrap();

    store.delete_provision(&n.id).await.unwrap();
    assert_err!(store.provision(&n.id).await, Error::NotFound(_));
    assert_eq!(store.pool_entries().await.unwrap(), keep_entries);
    assert_eq!(
        store.provisions_by_provider(&p.id).await.unwrap(),
        vec![keep]
    );
    assert_err!(store.delete_provision(&n.id).await, Error::NotFound(_));
}

/// A late heartbeat never moves `last_heartbeat` back.
pub async fn heartbeat_never_moves_backwards(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let n = new_provision(&p, at(0));
    store.create_provision(&n, &[]).await.unwrap();
    store.heartbeat(&n.id, at(5_000)).await.unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().last_heartbeat,
        at(5_000)
    );
    store.heartbeat(&n.id, at(4_000)).await.unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().last_heartbeat,
        at(5_000)
    );
    store.heartbeat(&n.id, at(6_000)).await.unwrap();
    assert_eq!(
        store.provision(&n.id).await.unwrap().last_heartbeat,
        at(6_000)
    );
}

/// Nodes last heard from before the cut-off end and lose their entries; the
/// rest (including one heard from exactly at the cut-off) stay.
pub async fn expire_provisions_ends_silent_nodes(store: Arc<dyn Store>) {
    let p = stored_provider(&store).await;
    let mut nodes = Vec::new();
    for (i, hb) in [1_000, 12_000, 10_000, 2_000].into_iter().enumerate() {
        let mut n = new_provision(&p, at(i as i64));
        n.state = ProvisionState::Ready;
        n.last_heartbeat = at(hb);
        store
            .create_provision(&n, &[entry(&n, Service::Chat, "m")])
            .await
            .unwrap();
        nodes.push(n);
    }
    // An already ended, silent node is not expired again.
    let mut ended = new_provision(&p, at(9));
    ended.state = ProvisionState::Ended;
    store.create_provision(&ended, &[]).await.unwrap();

    let mut want = vec![nodes[0].id.clone(), nodes[3].id.clone()];
    want.sort();
    let mut gone = store.expire_provisions(at(10_000)).await.unwrap();
    gone.sort();
    assert_eq!(gone, want);
    for n in [&nodes[0], &nodes[3]] {
        assert_eq!(
            store.provision(&n.id).await.unwrap().state,
            ProvisionState::Ended
        );
    }
    for n in [&nodes[1], &nodes[2]] {
        assert_eq!(
            store.provision(&n.id).await.unwrap().state,
            ProvisionState::Ready
        );
    }
    let live: Vec<ProvisionId> = store
        .pool_entries()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.provision_id)
        .collect();
    let mut want_live = vec![nodes[1].id.clone(), nodes[2].id.clone()];
    want_live.sort();
    let mut live_sorted = live;
    live_sorted.sort();
    assert_eq!(live_sorted, want_live);
    assert!(store
        .expire_provisions(at(10_000))
        .await
        .unwrap()
        .is_empty());
}

// ---- credits -------------------------------------------------------------------

/// A reservation takes the amount from the balance and the key's limit, marks
/// the key used and shows in the ledger.
pub async fn reserve_holds_balance_and_key_limit(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(4))).await;
    let r = reservation(&user, &key, Credits::micros(1_250_000), at(77));
    store.reserve(&r).await.unwrap();

    assert_eq!(balance(&store, &user).await, Credits::micros(8_750_000));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::micros(2_750_000)));
    assert_eq!(k.credit_limit, Some(Credits::whole(4)));
    assert_eq!(k.last_used_at, Some(at(77)));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(t.reserved, Credits::micros(1_250_000));
    assert_eq!(t.settlements, 0);
    assert_err!(store.settlement(&r.request_id).await, Error::NotFound(_));
}

/// A reservation over the balance is `InsufficientCredits` and changes nothing.
pub async fn reserve_insufficient_credits_changes_nothing(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(2), Some(Credits::whole(10))).await;
    let r = reservation(&user, &key, Credits::micros(2_000_001), at(1));
    assert_err!(store.reserve(&r).await, Error::InsufficientCredits(_));
    assert_eq!(balance(&store, &user).await, Credits::whole(2));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(10)));
    assert_eq!(k.last_used_at, None);
    assert_eq!(store.ledger_totals().await.unwrap().reserved, Credits::ZERO);
    // Nothing was held, so nothing can be settled.
    let st = settlement(&r, Credits::ZERO, None, at(2));
    assert_err!(store.settle(&st).await, Error::NotFound(_));
    // The whole balance is fine.
    store
        .reserve(&reservation(&user, &key, Credits::whole(2), at(3)))
        .await
        .unwrap();
    assert_eq!(balance(&store, &user).await, Credits::ZERO);
}

/// A reservation over the key's limit is `KeyLimitReached` and changes nothing.
pub async fn reserve_key_limit_changes_nothing(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(100), Some(Credits::whole(3))).await;
    store
        .reserve(&reservation(&user, &key, Credits::whole(2), at(1)))
        .await
        .unwrap();
    let r = reservation(&user, &key, Credits::micros(1_000_001), at(2));
    assert_err!(store.reserve(&r).await, Error::KeyLimitReached(_));
    assert_eq!(balance(&store, &user).await, Credits::whole(98));
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(1)));
    assert_eq!(
        store.ledger_totals().await.unwrap().reserved,
        Credits::whole(2)
    );
    // Another key of the same user is not limited by this one.
    let free = new_key(&user, None, at(3));
    store.create_api_key(&free).await.unwrap();
    store
        .reserve(&reservation(&user, &free, Credits::whole(50), at(4)))
        .await
        .unwrap();
    assert_eq!(balance(&store, &user).await, Credits::whole(48));
}

/// Unknown keys, revoked keys and other users' keys are `Unauthorized`.
pub async fn reserve_rejects_unknown_revoked_and_foreign_keys(store: Arc<dyn Store>) {
    let (alice, alice_key) = funded(&store, Credits::whole(10), None).await;
    let (bob, _) = funded(&store, Credits::whole(10), None).await;

    let unknown = new_key(&alice, None, T0);
    assert_err!(
        store
            .reserve(&reservation(&alice, &unknown, Credits::whole(1), at(1)))
            .await,
        Error::Unauthorized(_)
    );
    // Bob's reservation with Alice's key: the key is not his.
    assert_err!(
        store
            .reserve(&reservation(&bob, &alice_key, Credits::whole(1), at(2)))
            .await,
        Error::Unauthorized(_)
    );
    store.revoke_api_key(&alice_key.id, at(3)).await.unwrap();
    assert_err!(
        store
            .reserve(&reservation(&alice, &alice_key, Credits::whole(1), at(4)))
            .await,
        Error::Unauthorized(_)
    );
    assert_eq!(balance(&store, &alice).await, Credits::whole(10));
    assert_eq!(balance(&store, &bob).await, Credits::whole(10));
    assert_eq!(store.ledger_totals().await.unwrap().reserved, Credits::ZERO);
}

/// Suspended accounts and routes the key may not call are `Forbidden`.
pub async fn reserve_rejects_suspended_users_and_unpermitted_routes(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let mut embed_only = new_key(&user, None, at(1));
    embed_only.permitted_routes = vec![Route::Embeddings];
    store.create_api_key(&embed_only).await.unwrap();

    let chat = reservation(&user, &embed_only, Credits::whole(1), at(2));
    assert_err!(store.reserve(&chat).await, Error::Forbidden(_));
    let mut embed = reservation(&user, &embed_only, Credits::whole(1), at(3));
    embed.route = Route::Embeddings;
    store.reserve(&embed).await.unwrap();

    store
        .set_user_suspended(
            &user.id,
            Some(Suspension {
                reason: "fraud".into(),
                by: "system".into(),
                at: at(4),
            }),
        )
        .await
        .unwrap();
    assert_err!(
        store
            .reserve(&reservation(&user, &key, Credits::whole(1), at(5)))
            .await,
        Error::Forbidden(_)
    );
    assert_eq!(balance(&store, &user).await, Credits::whole(9));
    store.set_user_suspended(&user.id, None).await.unwrap();
    store
        .reserve(&reservation(&user, &key, Credits::whole(1), at(6)))
        .await
        .unwrap();
    assert_eq!(balance(&store, &user).await, Credits::whole(8));
}

/// A request id reserves once: again while open or after settling is `AlreadyExists`.
pub async fn reserve_same_request_twice_is_already_exists(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let r = reservation(&user, &key, Credits::whole(1), at(1));
    store.reserve(&r).await.unwrap();
    assert_err!(store.reserve(&r).await, Error::AlreadyExists(_));
    assert_eq!(balance(&store, &user).await, Credits::whole(9));
    store
        .settle(&settlement(&r, Credits::whole(1), None, at(2)))
        .await
        .unwrap();
    assert_err!(store.reserve(&r).await, Error::AlreadyExists(_));
    assert_eq!(balance(&store, &user).await, Credits::whole(9));
    assert_eq!(store.ledger_totals().await.unwrap().reserved, Credits::ZERO);
}

/// Settling charges what was charged, returns the rest to the user and the
/// key, credits the provider and stores the usage record.
pub async fn settle_charges_reserved_min_and_releases_rest(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(20), Some(Credits::whole(15))).await;
    let provider = stored_provider(&store).await;
    let r = reservation(&user, &key, Credits::whole(10), at(1));
    store.reserve(&r).await.unwrap();

    let st = settlement(
        &r,
        Credits::micros(4_000_123),
        Some((&provider, Credits::micros(3_000_000))),
        at(900),
    );
    assert_eq!(store.settle(&st).await.unwrap(), SettleOutcome::Applied);

    assert_eq!(balance(&store, &user).await, Credits::micros(15_999_877));
    assert_eq!(
        key_left(&store, &key).await,
        Some(Credits::micros(10_999_877))
    );
    assert_eq!(earnings(&store, &provider).await, Credits::whole(3));
    let mut want = st.usage.clone();
    want.charged = Credits::micros(4_000_123);
    want.reward = Credits::whole(3);
    assert_eq!(store.settlement(&r.request_id).await.unwrap(), want);
    assert_eq!(store.usage_records(&user.id, 10).await.unwrap(), vec![want]);
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(t.settlements, 1);
    assert_eq!(t.charged, Credits::micros(4_000_123));
    assert_eq!(t.rewarded, Credits::whole(3));
    assert_eq!(t.platform(), Credits::micros(1_000_123));
    assert_eq!(t.reserved, Credits::ZERO);
}

/// The usage record is filed under the reservation's user, key and route,
/// whatever the settlement's record says: usage always follows the money.
pub async fn settle_records_usage_under_the_reservations_user_and_key(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(5), None).await;
    let (other, other_key) = funded(&store, Credits::whole(5), None).await;
    let r = reservation(&user, &key, Credits::whole(1), at(1));
    store.reserve(&r).await.unwrap();
    let mut st = settlement(&r, Credits::whole(1), None, at(2));
    st.usage.user_id = other.id.clone();
    st.usage.key_id = other_key.id.clone();
    store.settle(&st).await.unwrap();
    let rec = store.settlement(&r.request_id).await.unwrap();
    assert_eq!(
        (&rec.user_id, &rec.key_id, rec.route),
        (&user.id, &key.id, r.route)
    );
    assert_eq!(store.usage_records(&user.id, 10).await.unwrap().len(), 1);
    assert!(store.usage_records(&other.id, 10).await.unwrap().is_empty());
}

/// A charge above the reservation is cut to it, and a reward above the
/// charge is cut to the charge.
pub async fn settle_clamps_charge_and_reward(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(8))).await;
    let provider = stored_provider(&store).await;
    let r = reservation(&user, &key, Credits::whole(5), at(1));
    store.reserve(&r).await.unwrap();
    let st = settlement(
        &r,
        Credits::whole(9),
        Some((&provider, Credits::whole(20))),
        at(2),
    );
    store.settle(&st).await.unwrap();

    assert_eq!(balance(&store, &user).await, Credits::whole(5));
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(3)));
    assert_eq!(earnings(&store, &provider).await, Credits::whole(5));
    let rec = store.settlement(&r.request_id).await.unwrap();
    assert_eq!(
        (rec.charged, rec.reward),
        (Credits::whole(5), Credits::whole(5))
    );
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.charged, t.rewarded),
        (Credits::whole(5), Credits::whole(5))
    );
    assert_eq!(t.platform(), Credits::ZERO);
}

/// A failed request (nothing charged, no reward) gives everything back.
pub async fn failed_request_costs_nothing(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(6))).await;
    let provider = stored_provider(&store).await;
    let r = reservation(&user, &key, Credits::whole(6), at(1));
    store.reserve(&r).await.unwrap();
    assert_eq!(key_left(&store, &key).await, Some(Credits::ZERO));
    // A reward on a zero charge is cut to zero too.
    let st = settlement(
        &r,
        Credits::ZERO,
        Some((&provider, Credits::whole(1))),
        at(2),
    );
    store.settle(&st).await.unwrap();
    assert_eq!(balance(&store, &user).await, Credits::whole(10));
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(6)));
    assert_eq!(earnings(&store, &provider).await, Credits::ZERO);
    let rec = store.settlement(&r.request_id).await.unwrap();
    assert_eq!((rec.charged, rec.reward), (Credits::ZERO, Credits::ZERO));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(t.settlements, 1);
    assert_eq!(
        (t.charged, t.rewarded, t.reserved),
        (Credits::ZERO, Credits::ZERO, Credits::ZERO)
    );
}

/// The same settlement applied twice has effect once: `AlreadySettled`.
pub async fn settle_twice_has_effect_once(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(10))).await;
    let provider = stored_provider(&store).await;
    let r = reservation(&user, &key, Credits::whole(4), at(1));
    store.reserve(&r).await.unwrap();
    let st = settlement(
        &r,
        Credits::whole(3),
        Some((&provider, Credits::whole(2))),
        at(2),
    );
    assert_eq!(store.settle(&st).await.unwrap(), SettleOutcome::Applied);
    let record = store.settlement(&r.request_id).await.unwrap();

    assert_eq!(
        store.settle(&st).await.unwrap(),
        SettleOutcome::AlreadySettled
    );
    // A different charge for the same request id changes nothing either.
    let mut other = settlement(&r, Credits::ZERO, None, at(3));
    other.usage.model = "other".into();
    assert_eq!(
        store.settle(&other).await.unwrap(),
        SettleOutcome::AlreadySettled
    );

    assert_eq!(balance(&store, &user).await, Credits::whole(7));
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(7)));
    assert_eq!(earnings(&store, &provider).await, Credits::whole(2));
    assert_eq!(store.settlement(&r.request_id).await.unwrap(), record);
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.settlements, t.charged, t.rewarded),
        (1, Credits::whole(3), Credits::whole(2))
    );
}

/// Settling a request that never reserved is `NotFound` and changes nothing.
pub async fn settle_unknown_request_is_not_found(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let provider = stored_provider(&store).await;
    let r = reservation(&user, &key, Credits::whole(4), at(1));
    let st = settlement(
        &r,
        Credits::whole(3),
        Some((&provider, Credits::whole(2))),
        at(2),
    );
    assert_err!(store.settle(&st).await, Error::NotFound(_));
    assert_err!(store.settlement(&r.request_id).await, Error::NotFound(_));
    assert_eq!(balance(&store, &user).await, Credits::whole(10));
    assert_eq!(earnings(&store, &provider).await, Credits::ZERO);
    assert_eq!(
        store.ledger_totals().await.unwrap(),
        LedgerTotals::default()
    );
}

/// A key's limit changed while a request was in flight: the refund never
/// leaves the key with more than its limit.
pub async fn settle_refund_never_lifts_key_above_its_limit(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(100), None).await;
    // Reserved while the key had no limit: the key's limit never held it.
    let r1 = reservation(&user, &key, Credits::whole(5), at(1));
    store.reserve(&r1).await.unwrap();
    let set_limit = |c: i64| ApiKeyUpdate {
        credit_limit: Some(Some(Credits::whole(c))),
        ..ApiKeyUpdate::default()
    };
    let k = store.update_api_key(&key.id, &set_limit(10)).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(10)));
    store
        .settle(&settlement(&r1, Credits::ZERO, None, at(2)))
        .await
        .unwrap();
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(10)));

    // Reserved under a limit that was then lowered below the reservation.
    let r2 = reservation(&user, &key, Credits::whole(8), at(3));
    store.reserve(&r2).await.unwrap();
    store.update_api_key(&key.id, &set_limit(5)).await.unwrap();
    assert_eq!(key_left(&store, &key).await, Some(Credits::ZERO));
    store
        .settle(&settlement(&r2, Credits::whole(1), None, at(4)))
        .await
        .unwrap();
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(5)));
    assert_eq!(balance(&store, &user).await, Credits::whole(99));
}

/// Reservations taken before the cut-off are settled at zero cost, no reward;
/// later ones stay open.
pub async fn release_stale_reservations_releases_only_old_ones(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(10))).await;
    let provider = stored_provider(&store).await;
    let old1 = reservation(&user, &key, Credits::whole(1), at(100));
    let old2 = reservation(&user, &key, Credits::whole(2), at(200));
    let edge = reservation(&user, &key, Credits::whole(3), at(250));
    for r in [&old1, &old2, &edge] {
        store.reserve(r).await.unwrap();
    }
    assert_eq!(balance(&store, &user).await, Credits::whole(4));

    assert_eq!(store.release_stale_reservations(at(250)).await.unwrap(), 2);
    assert_eq!(balance(&store, &user).await, Credits::whole(7));
    assert_eq!(key_left(&store, &key).await, Some(Credits::whole(7)));
    for r in [&old1, &old2] {
        let rec = store.settlement(&r.request_id).await.unwrap();
        assert_eq!(
            (rec.charged, rec.reward, rec.success),
            (Credits::ZERO, Credits::ZERO, false)
        );
        assert_eq!(rec.user_id, user.id);
        let st = settlement(
            r,
            Credits::whole(1),
            Some((&provider, Credits::whole(1))),
            at(300),
        );
        assert_eq!(
            store.settle(&st).await.unwrap(),
            SettleOutcome::AlreadySettled
        );
    }
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.settlements, t.charged, t.reserved),
        (2, Credits::ZERO, Credits::whole(3))
    );
    assert_eq!(store.release_stale_reservations(at(250)).await.unwrap(), 0);

    let st = settlement(
        &edge,
        Credits::whole(2),
        Some((&provider, Credits::whole(1))),
        at(400),
    );
    assert_eq!(store.settle(&st).await.unwrap(), SettleOutcome::Applied);
    assert_eq!(balance(&store, &user).await, Credits::whole(8));
    assert_eq!(earnings(&store, &provider).await, Credits::whole(1));
}

/// The ledger's sums match the usage records, and `reserved` tracks what is open.
pub async fn ledger_totals_add_up(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(1_000), None).await;
    let p1 = stored_provider(&store).await;
    let p2 = stored_provider(&store).await;
    let mut charged = 0i64;
    let mut rewarded = 0i64;
    let mut open = 0i64;
    for i in 0..30i64 {
        let amount = Credits::micros(1_000_000 + i * 7_919);
        let r = reservation(&user, &key, amount, at(i));
        store.reserve(&r).await.unwrap();
        if i % 5 == 4 {
            open += amount.0;
            continue;
        }
        let charge = amount.0 * (i % 4) / 3;
        let provider = if i % 2 == 0 { &p1 } else { &p2 };
        let reward = charge * 7 / 10 + (i % 3);
        let st = settlement(
            &r,
            Credits(charge),
            Some((provider, Credits(reward))),
            at(i + 50),
        );
        store.settle(&st).await.unwrap();
        let applied = charge.min(amount.0);
        charged += applied;
        rewarded += reward.min(applied);
    }
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(t.settlements, 24);
    assert_eq!(t.charged, Credits(charged));
    assert_eq!(t.rewarded, Credits(rewarded));
    assert_eq!(t.reserved, Credits(open));
    assert_eq!(t.charged, t.rewarded.saturating_add(t.platform()));
    let records = store.usage_records(&user.id, 1_000).await.unwrap();
    assert_eq!(records.len(), 24);
    assert_eq!(records.iter().map(|r| r.charged.0).sum::<i64>(), charged);
    assert_eq!(records.iter().map(|r| r.reward.0).sum::<i64>(), rewarded);
    assert_eq!(
        earnings(&store, &p1)
            .await
            .saturating_add(earnings(&store, &p2).await),
        Credits(rewarded)
    );
    assert_eq!(
        balance(&store, &user).await,
        Credits(Credits::whole(1_000).0 - charged - open)
    );
}

/// `usage_records` lists one user's settled requests, newest first, at most `limit`.
pub async fn usage_records_newest_first_per_user(store: Arc<dyn Store>) {
    let (alice, alice_key) = funded(&store, Credits::whole(10), None).await;
    let (bob, bob_key) = funded(&store, Credits::whole(10), None).await;
    let mut alice_ids = Vec::new();
    for finished in [300, 100, 200] {
        let r = reservation(&alice, &alice_key, Credits::micros(10), at(1));
        store.reserve(&r).await.unwrap();
        store
            .settle(&settlement(&r, Credits::micros(5), None, at(finished)))
            .await
            .unwrap();
        alice_ids.push((finished, r.request_id));
    }
    let rb = reservation(&bob, &bob_key, Credits::micros(10), at(1));
    store.reserve(&rb).await.unwrap();
    store
        .settle(&settlement(&rb, Credits::micros(5), None, at(1_000)))
        .await
        .unwrap();

    alice_ids.sort_by_key(|x| std::cmp::Reverse(x.0));
    let want: Vec<RequestId> = alice_ids.into_iter().map(|(_, id)| id).collect();
    let got: Vec<RequestId> = store
        .usage_records(&alice.id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.request_id)
        .collect();
    assert_eq!(got, want);
    let two = store.usage_records(&alice.id, 2).await.unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(two[0].request_id, want[0]);
    let bobs = store.usage_records(&bob.id, 10).await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].request_id, rb.request_id);
}

// ---- pricing -------------------------------------------------------------------

/// A price replaces the one for the same service and model; a service's
/// default (no model) is a different price from any model's.
pub async fn put_price_replaces_same_service_and_model(store: Arc<dyn Store>) {
    assert!(store.prices().await.unwrap().is_empty());
    let price = |service: Service, model: Option<&str>, per_request: i64| PriceEntry {
        service,
        model: model.map(str::to_owned),
        per_request: Credits::micros(per_request),
        per_million_input_tokens: Credits::micros(150_000),
        per_million_output_tokens: Credits::micros(600_000),
        per_million_units: Credits::ZERO,
    };
    let chat_default = price(Service::Chat, None, 10);
    let chat_llama = price(Service::Chat, Some("llama3.2:3b"), 20);
    let embed_default = price(Service::Embeddings, None, 1);
    for p in [&chat_default, &chat_llama, &embed_default] {
        store.put_price(p).await.unwrap();
    }
    let chat_llama2 = price(Service::Chat, Some("llama3.2:3b"), 25);
    store.put_price(&chat_llama2).await.unwrap();

    let key = |p: &PriceEntry| (p.service, p.model.clone());
    let mut got = store.prices().await.unwrap();
    got.sort_by_key(key);
    let mut want = vec![chat_default, chat_llama2, embed_default];
    want.sort_by_key(key);
    assert_eq!(got, want);
}

// ---- sign-in -------------------------------------------------------------------

fn login_code(email: &str, code: &str, created: Timestamp) -> LoginCode {
    LoginCode {
        email: email.to_owned(),
        code_hash: KeyHash::of(code),
        expires_at: Timestamp(created.0 + 600_000),
        created_at: created,
    }
}

/// A right code signs in once; the second use is `Unauthorized`.
pub async fn login_code_is_single_use(store: Arc<dyn Store>) {
    let c = login_code("a@example.com", "123456", at(0));
    store.issue_login_code(&c, at(-3_600_000), 5).await.unwrap();
    assert_err!(
        store
            .verify_login_code("b@example.com", &KeyHash::of("123456"), at(1), 5)
            .await,
        Error::Unauthorized(_)
    );
    store
        .verify_login_code("a@example.com", &KeyHash::of("123456"), at(1), 5)
        .await
        .unwrap();
    assert_err!(
        store
            .verify_login_code("a@example.com", &KeyHash::of("123456"), at(2), 5)
            .await,
        Error::Unauthorized(_)
    );
}

/// A code stops working at its expiry instant.
pub async fn login_code_expires(store: Arc<dyn Store>) {
    let c = login_code("a@example.com", "111111", at(0));
    store.issue_login_code(&c, at(-3_600_000), 5).await.unwrap();
    assert_err!(
        store
            .verify_login_code("a@example.com", &c.code_hash, c.expires_at, 5)
            .await,
        Error::Unauthorized(_)
    );
    let d = login_code("b@example.com", "222222", at(0));
    store.issue_login_code(&d, at(-3_600_000), 5).await.unwrap();
    store
        .verify_login_code(
            "b@example.com",
            &d.code_hash,
            Timestamp(d.expires_at.0 - 1),
            5,
        )
        .await
        .unwrap();
}

/// After `max` wrong tries even the right code fails; fewer wrong tries do not
/// stop it.
pub async fn login_code_attempts_are_limited(store: Arc<dyn Store>) {
    let wrong = KeyHash::of("000000");
    let c = login_code("a@example.com", "424242", at(0));
    store.issue_login_code(&c, at(-3_600_000), 5).await.unwrap();
    for i in 0..3 {
        assert_err!(
            store
                .verify_login_code("a@example.com", &wrong, at(1 + i), 3)
                .await,
            Error::Unauthorized(_)
        );
    }
    assert_err!(
        store
            .verify_login_code("a@example.com", &c.code_hash, at(10), 3)
            .await,
        Error::Unauthorized(_)
    );

    let d = login_code("b@example.com", "434343", at(0));
    store.issue_login_code(&d, at(-3_600_000), 5).await.unwrap();
    for i in 0..2 {
        assert_err!(
            store
                .verify_login_code("b@example.com", &wrong, at(1 + i), 3)
                .await,
            Error::Unauthorized(_)
        );
    }
    store
        .verify_login_code("b@example.com", &d.code_hash, at(10), 3)
        .await
        .unwrap();
}

/// A new code replaces the old one and starts with no wrong tries.
pub async fn login_code_reissue_replaces_and_resets_attempts(store: Arc<dyn Store>) {
    let wrong = KeyHash::of("000000");
    let first = login_code("a@example.com", "111111", at(0));
    store
        .issue_login_code(&first, at(-3_600_000), 5)
        .await
        .unwrap();
    for i in 0..3 {
        let _ = store
            .verify_login_code("a@example.com", &wrong, at(1 + i), 3)
            .await;
    }
    let second = login_code("a@example.com", "222222", at(100));
    store
        .issue_login_code(&second, at(-3_600_000), 5)
        .await
        .unwrap();
    assert_err!(
        store
            .verify_login_code("a@example.com", &first.code_hash, at(101), 3)
            .await,
        Error::Unauthorized(_)
    );
    store
        .verify_login_code("a@example.com", &second.code_hash, at(102), 3)
        .await
        .unwrap();
}

/// At most `max_per_window` codes per email in the window; older issues and
/// other emails do not count.
pub async fn login_codes_are_rate_limited_per_window(store: Arc<dyn Store>) {
    let hour = 3_600_000;
    for i in 0..3 {
        let c = login_code("a@example.com", &format!("00000{i}"), at(i * 1_000));
        store.issue_login_code(&c, at(-hour), 3).await.unwrap();
    }
    let fourth = login_code("a@example.com", "999999", at(5_000));
    assert_err!(
        store.issue_login_code(&fourth, at(5_000 - hour), 3).await,
        Error::RateLimited(_)
    );
    // The refused code was not stored: the last issued one still works.
    assert_err!(
        store
            .verify_login_code("a@example.com", &fourth.code_hash, at(5_001), 5)
            .await,
        Error::Unauthorized(_)
    );
    // Another email has its own window.
    let other = login_code("b@example.com", "555555", at(5_000));
    store
        .issue_login_code(&other, at(5_000 - hour), 3)
        .await
        .unwrap();
    // Once the first issue falls out of the window, one more is allowed.
    let later = login_code("a@example.com", "777777", at(hour + 500));
    store.issue_login_code(&later, at(500), 3).await.unwrap();
    let again = login_code("a@example.com", "888888", at(hour + 600));
    assert_err!(
        store.issue_login_code(&again, at(600), 3).await,
        Error::RateLimited(_)
    );
    store
        .verify_login_code("a@example.com", &later.code_hash, at(hour + 700), 5)
        .await
        .unwrap();
}

/// Housekeeping deletes the codes issued before the cut, used or not, and
/// the issue records of emails last issued one before it; newer codes stay.
pub async fn old_login_codes_are_pruned(store: Arc<dyn Store>) {
    let hour = 3_600_000;
    let issue = |c: LoginCode| {
        let store = store.clone();
        async move {
            let window = Timestamp(c.created_at.0 - hour);
            store.issue_login_code(&c, window, 5).await.unwrap();
        }
    };
    let a = login_code("a@example.com", "111111", at(0));
    issue(a.clone()).await;
    issue(login_code("b@example.com", "222222", at(1_000))).await;
    let used = login_code("u@example.com", "333333", at(2_000));
    issue(used.clone()).await;
    store
        .verify_login_code("u@example.com", &used.code_hash, at(2_001), 5)
        .await
        .unwrap();
    let c = login_code("c@example.com", "444444", at(hour));
    issue(c.clone()).await;
    // An old code replaced by a newer one.
    issue(login_code("e@example.com", "555555", at(0))).await;
    let e = login_code("e@example.com", "666666", at(hour + 1));
    issue(e.clone()).await;

    // a's and b's codes go (the used one was gone already); again, nothing.
    assert_eq!(store.prune_login_codes(at(hour)).await.unwrap(), 2);
    assert_eq!(store.prune_login_codes(at(hour)).await.unwrap(), 0);
    // A pruned code is gone, even at a time it would still be valid.
    assert_err!(
        store
            .verify_login_code("a@example.com", &a.code_hash, at(10), 5)
            .await,
        Error::Unauthorized(_)
    );
    // So is a's record of issues: a limit of one in a window reaching back
    // to its old code allows a new one.
    let again = login_code("a@example.com", "777777", at(hour + 20));
    store.issue_login_code(&again, at(-hour), 1).await.unwrap();
    // Newer codes still work.
    for (email, code) in [("c@example.com", &c), ("e@example.com", &e)] {
        store
            .verify_login_code(email, &code.code_hash, at(hour + 30), 5)
            .await
            .unwrap();
    }
}

fn refresh(
    user: &UserId,
    family: &TokenFamilyId,
    secret: &str,
    created: Timestamp,
) -> RefreshToken {
    RefreshToken {
        hash: KeyHash::of(secret),
        family: family.clone(),
        user_id: user.clone(),
        expires_at: Timestamp(created.0 + 86_400_000),
        created_at: created,
    }
}

/// Rotation returns the user, keeps the family, and the new token rotates on.
pub async fn refresh_token_rotates(store: Arc<dyn Store>) {
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    assert_err!(
        store.create_refresh_token(&t1).await,
        Error::AlreadyExists(_)
    );
    assert_eq!(store.refresh_token_family(&t1.hash).await.unwrap(), fam);

    let t2 = refresh(&user, &fam, "t2", at(10));
    assert_eq!(
        store
            .rotate_refresh_token(&t1.hash, &t2, at(10))
            .await
            .unwrap(),
        user
    );
    assert_eq!(store.refresh_token_family(&t2.hash).await.unwrap(), fam);
    let t3 = refresh(&user, &fam, "t3", at(20));
    assert_eq!(
        store
            .rotate_refresh_token(&t2.hash, &t3, at(20))
            .await
            .unwrap(),
        user
    );
    assert_err!(
        store
            .rotate_refresh_token(
                &KeyHash::of("never issued"),
                &refresh(&user, &fam, "x", at(21)),
                at(21)
            )
            .await,
        Error::Unauthorized(_)
    );
}

/// Presenting a used token revokes the whole family: the newest token stops
/// working too.
pub async fn refresh_token_reuse_revokes_family(store: Arc<dyn Store>) {
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let other_fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    let o1 = refresh(&user, &other_fam, "o1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    store.create_refresh_token(&o1).await.unwrap();
    let t2 = refresh(&user, &fam, "t2", at(10));
    store
        .rotate_refresh_token(&t1.hash, &t2, at(10))
        .await
        .unwrap();

    // An attacker replays t1.
    let stolen = refresh(&user, &fam, "t2-attacker", at(20));
    assert_err!(
        store.rotate_refresh_token(&t1.hash, &stolen, at(20)).await,
        Error::Unauthorized(_)
    );
    // The legitimate newest token is dead too, and so is the attacker's.
    let t3 = refresh(&user, &fam, "t3", at(30));
    assert_err!(
        store.rotate_refresh_token(&t2.hash, &t3, at(30)).await,
        Error::Unauthorized(_)
    );
    let s2 = refresh(&user, &fam, "s2", at(31));
    assert_err!(
        store.rotate_refresh_token(&stolen.hash, &s2, at(31)).await,
        Error::Unauthorized(_)
    );
    // Another sign-in of the same user is unaffected.
    let o2 = refresh(&user, &other_fam, "o2", at(40));
    assert_eq!(
        store
            .rotate_refresh_token(&o1.hash, &o2, at(40))
            .await
            .unwrap(),
        user
    );
}

/// Expired tokens and tokens of a revoked family do not rotate.
pub async fn refresh_token_expiry_and_revocation(store: Arc<dyn Store>) {
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    let next = refresh(&user, &fam, "t2", t1.expires_at);
    assert_err!(
        store
            .rotate_refresh_token(&t1.hash, &next, t1.expires_at)
            .await,
        Error::Unauthorized(_)
    );

    let fam2 = TokenFamilyId::generate();
    let u1 = refresh(&user, &fam2, "u1", at(0));
    store.create_refresh_token(&u1).await.unwrap();
    store.revoke_token_family(&fam2).await.unwrap();
    assert_err!(
        store
            .rotate_refresh_token(&u1.hash, &refresh(&user, &fam2, "u2", at(1)), at(1))
            .await,
        Error::Unauthorized(_)
    );
}

/// Housekeeping deletes the refresh tokens that expired before the cut, used
/// or not; later ones keep working, and a revoked family with a live token
/// stays revoked.
pub async fn expired_refresh_tokens_are_pruned(store: Arc<dyn Store>) {
    let day = 86_400_000;
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    let t2 = refresh(&user, &fam, "t2", at(10));
    store
        .rotate_refresh_token(&t1.hash, &t2, at(10))
        .await
        .unwrap();
    let ended = TokenFamilyId::generate();
    let u1 = refresh(&user, &ended, "u1", at(0));
    store.create_refresh_token(&u1).await.unwrap();
    store.revoke_token_family(&ended).await.unwrap();
    let revoked = TokenFamilyId::generate();
    let v1 = refresh(&user, &revoked, "v1", at(day));
    store.create_refresh_token(&v1).await.unwrap();
    store.revoke_token_family(&revoked).await.unwrap();

    // t1 (used) and u1 expired at `day`; t2 and v1 later.
    assert_eq!(store.prune_refresh_tokens(at(day + 5)).await.unwrap(), 2);
    assert_eq!(store.prune_refresh_tokens(at(day + 5)).await.unwrap(), 0);
    for gone in [&t1, &u1] {
        assert_err!(
            store.refresh_token_family(&gone.hash).await,
            Error::NotFound(_)
        );
    }
    assert_eq!(store.refresh_token_family(&t2.hash).await.unwrap(), fam);
    let t3 = refresh(&user, &fam, "t3", at(day + 6));
    assert_eq!(
        store
            .rotate_refresh_token(&t2.hash, &t3, at(day + 6))
            .await
            .unwrap(),
        user
    );
    assert_err!(
        store
            .rotate_refresh_token(
                &v1.hash,
                &refresh(&user, &revoked, "v2", at(day + 7)),
                at(day + 7)
            )
            .await,
        Error::Unauthorized(_)
    );
}

// ---- notifications -----------------------------------------------------------

/// Notifications are put (replacing by id), listed by start time and deleted.
pub async fn notifications_put_replace_delete(store: Arc<dyn Store>) {
    let n = |title: &str, starts: i64, placements: Vec<Placement>| Notification {
        id: NotificationId::generate(),
        title: title.into(),
        banner: format!("{title} banner"),
        popup: String::new(),
        starts_at: at(starts),
        ends_at: at(starts + 1_000),
        placements,
    };
    let late = n("late", 500, vec![Placement::Homepage]);
    let early = n(
        "early",
        100,
        vec![Placement::UserDashboard, Placement::ProviderDashboard],
    );
    store.put_notification(&late).await.unwrap();
    store.put_notification(&early).await.unwrap();
    assert_eq!(
        store.notifications().await.unwrap(),
        vec![early.clone(), late.clone()]
    );

    let mut moved = late.clone();
    moved.starts_at = at(50);
    moved.title = "moved".into();
    store.put_notification(&moved).await.unwrap();
    assert_eq!(
        store.notifications().await.unwrap(),
        vec![moved.clone(), early.clone()]
    );

    store.delete_notification(&moved.id).await.unwrap();
    assert_eq!(store.notifications().await.unwrap(), vec![early]);
    assert_err!(
        store.delete_notification(&moved.id).await,
        Error::NotFound(_)
    );
}

// ---- stats -------------------------------------------------------------------

/// A batch applied twice adds once; batches with other ids add up.
pub async fn record_stats_is_idempotent_per_batch(store: Arc<dyn Store>) {
    let day = at(0).day();
    let batch = StatsBatch {
        id: "host-a:1".into(),
        deltas: vec![(day, "network".into(), counters(4, 400, vec![1, 3]))],
    };
    store.record_stats(&batch).await.unwrap();
    store.record_stats(&batch).await.unwrap();
    assert_eq!(
        store.stats("network", day, day).await.unwrap(),
        vec![(day, counters(4, 400, vec![1, 3]))]
    );
    let second = StatsBatch {
        id: "host-a:2".into(),
        deltas: vec![(day, "network".into(), counters(8, 800, vec![0, 1, 7]))],
    };
    store.record_stats(&second).await.unwrap();
    assert_eq!(
        store.stats("network", day, day).await.unwrap(),
        vec![(day, counters(12, 1_200, vec![1, 4, 7]))]
    );
}

/// `stats` returns one scope's days within the range, inclusive, by day.
pub async fn stats_over_day_range(store: Arc<dyn Store>) {
    let d0 = Day::from_ymd(2026, 1, 1).unwrap();
    let mut deltas = Vec::new();
    for i in 0..6 {
        deltas.push((
            d0.plus_days(i),
            "endpoint:/v1/chat/completions".to_owned(),
            counters(1 + i as u64, 10, vec![1]),
        ));
        deltas.push((
            d0.plus_days(i),
            "endpoint:/v1/embeddings".to_owned(),
            counters(100, 1, vec![]),
        ));
    }
    // Two deltas for the same day and scope in one batch add up.
    deltas.push((
        d0.plus_days(2),
        "endpoint:/v1/chat/completions".to_owned(),
        counters(4, 5, vec![0, 2]),
    ));
    store
        .record_stats(&StatsBatch {
            id: "b1".into(),
            deltas,
        })
        .await
        .unwrap();

    let got = store
        .stats(
            "endpoint:/v1/chat/completions",
            d0.plus_days(1),
            d0.plus_days(3),
        )
        .await
        .unwrap();
    let mut day2 = counters(3, 10, vec![1]);
    day2.add(&counters(4, 5, vec![0, 2]));
    assert_eq!(
        got,
        vec![
            (d0.plus_days(1), counters(2, 10, vec![1])),
            (d0.plus_days(2), day2),
            (d0.plus_days(3), counters(4, 10, vec![1])),
        ]
    );
    assert!(store
        .stats(
            "endpoint:/v1/chat/completions",
            d0.plus_days(3),
            d0.plus_days(1)
        )
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .stats("endpoint:/v1/chat", d0, d0.plus_days(9))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .stats(
                "endpoint:/v1/embeddings",
                d0.plus_days(-5),
                d0.plus_days(50)
            )
            .await
            .unwrap()
            .len(),
        6
    );
}

/// `stats_by_prefix` sums each matching scope over the range.
pub async fn stats_by_prefix_sums_scopes(store: Arc<dyn Store>) {
    let d0 = Day::from_ymd(2026, 3, 1).unwrap();
    let deltas = vec![
        (d0, "model:chat:a".to_owned(), counters(1, 10, vec![1, 0])),
        (
            d0.plus_days(1),
            "model:chat:a".to_owned(),
            counters(2, 20, vec![0, 2]),
        ),
        (
            d0.plus_days(5),
            "model:chat:a".to_owned(),
            counters(50, 500, vec![]),
        ),
        (d0, "model:chat:b".to_owned(), counters(3, 30, vec![3])),
        (d0, "model:embeddings:e".to_owned(), counters(7, 70, vec![])),
        (d0, "model:chatx".to_owned(), counters(9, 90, vec![])),
        (d0, "app:model:chat:a".to_owned(), counters(11, 110, vec![])),
    ];
    store
        .record_stats(&StatsBatch {
            id: "b".into(),
            deltas,
        })
        .await
        .unwrap();

    let mut a = counters(1, 10, vec![1, 0]);
    a.add(&counters(2, 20, vec![0, 2]));
    let mut got = store
        .stats_by_prefix("model:chat:", d0, d0.plus_days(1))
        .await
        .unwrap();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        vec![
            ("model:chat:a".to_owned(), a),
            ("model:chat:b".to_owned(), counters(3, 30, vec![3])),
        ]
    );
    let mut all = store
        .stats_by_prefix("model:", d0, d0)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect::<Vec<_>>();
    all.sort();
    assert_eq!(
        all,
        [
            "model:chat:a",
            "model:chat:b",
            "model:chatx",
            "model:embeddings:e"
        ]
    );
    assert!(store
        .stats_by_prefix("model:chat:", d0.plus_days(2), d0.plus_days(4))
        .await
        .unwrap()
        .is_empty());
}

// ---- concurrency ---------------------------------------------------------------

/// 100 concurrent reservations of 1 credit against 37: exactly 37 succeed, the
/// balance ends at zero and is never negative.
pub async fn concurrent_reservations_never_overdraw(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(37), None).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (store, user, key) = (store.clone(), user.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store
                .reserve(&reservation(&user, &key, Credits::whole(1), at(i)))
                .await
        }));
    }
    let (mut ok, mut short) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(Error::InsufficientCredits(_)) => short += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((ok, short), (37, 63));
    assert_eq!(balance(&store, &user).await, Credits::ZERO);
    assert_eq!(
        store.ledger_totals().await.unwrap().reserved,
        Credits::whole(37)
    );
}

/// Concurrent reservations on a limited key: the key's limit holds as exactly
/// as the balance does.
pub async fn concurrent_reservations_respect_key_limit(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(100), Some(Credits::whole(20))).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (store, user, key) = (store.clone(), user.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store
                .reserve(&reservation(&user, &key, Credits::whole(1), at(i)))
                .await
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(Error::KeyLimitReached(_)) => limited += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((ok, limited), (20, 40));
    assert_eq!(balance(&store, &user).await, Credits::whole(80));
    assert_eq!(key_left(&store, &key).await, Some(Credits::ZERO));
}

/// 200 concurrent settles of different requests: every one lands, no update is lost.
pub async fn concurrent_settles_lose_no_update(store: Arc<dyn Store>) {
    const N: i64 = 200;
    let (user, key) = funded(&store, Credits::whole(1_000), Some(Credits::whole(900))).await;
    let provider = stored_provider(&store).await;
    let mut reservations = Vec::new();
    for i in 0..N {
        let r = reservation(&user, &key, Credits::whole(2), at(i));
        store.reserve(&r).await.unwrap();
        reservations.push(r);
    }
    let mut tasks = Vec::new();
    for (i, r) in reservations.into_iter().enumerate() {
        let (store, provider) = (store.clone(), provider.clone());
        tasks.push(tokio::spawn(async move {
            let charge = Credits::micros(1_000_000 + i as i64);
            let st = settlement(
                &r,
                charge,
                Some((&provider, Credits::micros(600_000))),
                at(1_000),
            );
            store.settle(&st).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").unwrap(), SettleOutcome::Applied);
    }
    let charged: i64 = (0..N).map(|i| 1_000_000 + i).sum();
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(t.settlements, N as u64);
    assert_eq!(t.charged, Credits(charged));
    assert_eq!(t.rewarded, Credits(600_000 * N));
    assert_eq!(t.reserved, Credits::ZERO);
    assert_eq!(earnings(&store, &provider).await, Credits(600_000 * N));
    assert_eq!(
        balance(&store, &user).await,
        Credits(Credits::whole(1_000).0 - charged)
    );
    assert_eq!(
        key_left(&store, &key).await,
        Some(Credits(Credits::whole(900).0 - charged))
    );
    assert_eq!(
        store.usage_records(&user.id, 1_000).await.unwrap().len(),
        N as usize
    );
}

/// The same settlement raced by 20 tasks applies exactly once.
pub async fn concurrent_duplicate_settles_apply_once(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let provider = stored_provider(&store).await;
    let r = reservation(&user, &key, Credits::whole(5), at(0));
    store.reserve(&r).await.unwrap();
    let st = settlement(
        &r,
        Credits::whole(3),
        Some((&provider, Credits::whole(2))),
        at(1),
    );
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (store, st) = (store.clone(), st.clone());
        tasks.push(tokio::spawn(async move { store.settle(&st).await }));
    }
    let mut applied = 0;
    for t in tasks {
        match t.await.expect("task").unwrap() {
            SettleOutcome::Applied => applied += 1,
            SettleOutcome::AlreadySettled => {}
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(balance(&store, &user).await, Credits::whole(7));
    assert_eq!(earnings(&store, &provider).await, Credits::whole(2));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.settlements, t.charged, t.rewarded),
        (1, Credits::whole(3), Credits::whole(2))
    );
}
