//! Conformance cases of [`UserStore`](crate::store::UserStore): users and their
//! API keys.

use std::sync::Arc;

use crate::error::Error;
use crate::store::Store;
use crate::types::*;

use super::fixtures::*;

// ---- users ------------------------------------------------------------------

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

// ---- API keys ---------------------------------------------------------------

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
        ..ApiKeyUpdate::default()
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
                ..ApiKeyUpdate::default()
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

// ---- rate limits ------------------------------------------------------------

/// A key's rate limits are stored with it, changed one at a time, removed by
/// `Some(None)`, and left alone by everything else.
pub async fn rate_limits_round_trip_and_change(store: Arc<dyn Store>) {
    let user = new_user("rates@example.com", Credits::whole(1));
    store.create_user(&user).await.unwrap();
    let mut key = new_key(&user, None, at(1));
    key.rate_limits = RateLimits {
        rpm: Some(60),
        tpm: Some(1_000_000_000_000),
    };
    store.create_api_key(&key).await.unwrap();
    assert_eq!(store.api_key_by_hash(&key.hash).await.unwrap(), key);

    let change = |rpm, tpm| ApiKeyUpdate {
        rpm,
        tpm,
        ..ApiKeyUpdate::default()
    };
    let k = store
        .update_api_key(&key.id, &change(Some(Some(5)), None))
        .await
        .unwrap();
    assert_eq!(k.rate_limits.rpm, Some(5));
    assert_eq!(k.rate_limits.tpm, Some(1_000_000_000_000));
    let k = store
        .update_api_key(&key.id, &change(None, Some(None)))
        .await
        .unwrap();
    assert_eq!(
        k.rate_limits,
        RateLimits {
            rpm: Some(5),
            tpm: None
        }
    );
    // Other changes keep the limits.
    let rename = ApiKeyUpdate {
        name: Some("renamed".into()),
        ..ApiKeyUpdate::default()
    };
    let k = store.update_api_key(&key.id, &rename).await.unwrap();
    assert_eq!(k.rate_limits.rpm, Some(5));
    assert_eq!(store.api_keys(&user.id).await.unwrap(), vec![k.clone()]);
    let k = store
        .update_api_key(&key.id, &change(Some(None), Some(Some(7))))
        .await
        .unwrap();
    assert_eq!(
        k.rate_limits,
        RateLimits {
            rpm: None,
            tpm: Some(7)
        }
    );
    assert_eq!(store.api_key_by_hash(&key.hash).await.unwrap(), k);
}

/// A key's budget is stored with it, changed, removed by `Some(None)`, and
/// left alone by every other change.
pub async fn budgets_round_trip_and_change(store: Arc<dyn Store>) {
    let user = new_user("budgets@example.com", Credits::whole(1));
    store.create_user(&user).await.unwrap();
    let mut key = new_key(&user, None, at(1));
    let daily = Budget {
        limit: Credits(1_000_000_000_000),
        period: BudgetPeriod::Day,
    };
    key.budget = Some(daily);
    store.create_api_key(&key).await.unwrap();
    assert_eq!(store.api_key_by_hash(&key.hash).await.unwrap(), key);

    let change = |budget| ApiKeyUpdate {
        budget,
        ..ApiKeyUpdate::default()
    };
    let monthly = Budget {
        limit: Credits(7),
        period: BudgetPeriod::Month,
    };
    let k = store
        .update_api_key(&key.id, &change(Some(Some(monthly))))
        .await
        .unwrap();
    assert_eq!(k.budget, Some(monthly));
    let rename = ApiKeyUpdate {
        name: Some("renamed".into()),
        rpm: Some(Some(3)),
        ..ApiKeyUpdate::default()
    };
    let k = store.update_api_key(&key.id, &rename).await.unwrap();
    assert_eq!(k.budget, Some(monthly), "other changes keep the budget");
    assert_eq!(store.api_keys(&user.id).await.unwrap(), vec![k.clone()]);
    let k = store
        .update_api_key(&key.id, &change(Some(None)))
        .await
        .unwrap();
    assert_eq!(k.budget, None);
    assert_eq!(store.api_key_by_hash(&key.hash).await.unwrap(), k);
}

/// An account's budget and alerts are stored with it (created with them or
/// changed), removed by `Some(None)`, and kept by a grant, a reservation
/// and a suspension; an unknown account is `NotFound`.
pub async fn user_settings_round_trip_and_change(store: Arc<dyn Store>) {
    let mut user = new_user("settings@example.com", Credits::whole(3));
    let daily = Budget {
        limit: Credits(1_000_000_000_000),
        period: BudgetPeriod::Day,
    };
    user.budget = Some(daily);
    user.alerts.balance_below = Some(Credits::whole(1));
    store.create_user(&user).await.unwrap();
    assert_eq!(store.user(&user.id).await.unwrap(), user);

    let monthly = Budget {
        limit: Credits(7),
        period: BudgetPeriod::Month,
    };
    let alerts = Alerts {
        balance_below: Some(Credits(5)),
        budget_percent: Some(80),
    };
    let change = UserSettingsUpdate {
        budget: Some(Some(monthly)),
        alerts: Some(alerts),
    };
    let u = store.update_user_settings(&user.id, &change).await.unwrap();
    assert_eq!((u.budget, u.alerts), (Some(monthly), alerts));
    // An absent field stays.
    let only_alerts = UserSettingsUpdate {
        alerts: Some(Alerts::default()),
        ..UserSettingsUpdate::default()
    };
    let u = store
        .update_user_settings(&user.id, &only_alerts)
        .await
        .unwrap();
    assert_eq!((u.budget, u.alerts), (Some(monthly), Alerts::default()));
    let u = store.update_user_settings(&user.id, &change).await.unwrap();

    // Money and suspension leave the settings alone.
    let grant = CreditGrant {
        user_id: user.id.clone(),
        amount: Credits::whole(2),
        by: "usr_admin".into(),
        reason: "settings".into(),
        at: at(2),
    };
    store.grant_credits(&grant).await.unwrap();
    let key = new_key(&user, None, at(3));
    store.create_api_key(&key).await.unwrap();
    store
        .reserve(&reservation(&user, &key, Credits(10), at(4)))
        .await
        .unwrap();
    store.set_user_suspended(&user.id, None).await.unwrap();
    let read = store.user(&user.id).await.unwrap();
    assert_eq!((read.budget, read.alerts), (u.budget, u.alerts));
    assert_eq!(read.credits, Credits(5_000_000 - 10));
    assert_eq!(store.user_by_email(&user.email).await.unwrap(), read);

    let remove = UserSettingsUpdate {
        budget: Some(None),
        ..UserSettingsUpdate::default()
    };
    let u = store.update_user_settings(&user.id, &remove).await.unwrap();
    assert_eq!((u.budget, u.alerts), (None, alerts));
    assert_eq!(store.user(&user.id).await.unwrap(), u);

    let nobody = UserId::new("usr_nobody");
    assert!(matches!(
        store.update_user_settings(&nobody, &change).await,
        Err(Error::NotFound(_))
    ));
}

/// An alert mark changes only from the state the caller names: set from
/// none, moved on, cleared; a stale `from` changes nothing; an unknown
/// account is no swap. Marks of one kind leave the other alone.
pub async fn alert_marks_swap_only_from_the_state_named(store: Arc<dyn Store>) {
    let user = new_user("marks@example.com", Credits::whole(1));
    store.create_user(&user).await.unwrap();
    let (s, id) = (&store, &user.id);
    let swap = |kind, from: Option<i64>, to: Option<i64>| async move {
        s.swap_alert_mark(id, kind, from.map(at), to.map(at))
            .await
            .unwrap()
    };
    assert!(swap(AlertKind::Balance, None, Some(10)).await);
    assert!(!swap(AlertKind::Balance, None, Some(11)).await, "taken");
    assert!(!swap(AlertKind::Balance, Some(9), None).await, "stale");
    assert!(swap(AlertKind::Budget, None, Some(20)).await);
    assert!(swap(AlertKind::Budget, Some(20), Some(30)).await);
    let u = store.user(&user.id).await.unwrap();
    assert_eq!(
        u.alerted,
        AlertMarks {
            balance: Some(at(10)),
            budget: Some(at(30)),
        }
    );
    assert!(swap(AlertKind::Balance, Some(10), None).await);
    let u = store.user(&user.id).await.unwrap();
    assert_eq!((u.alerted.balance, u.alerted.budget), (None, Some(at(30))));
    // Changing the settings keeps the marks.
    let change = UserSettingsUpdate {
        alerts: Some(Alerts {
            balance_below: Some(Credits(1)),
            budget_percent: None,
        }),
        ..UserSettingsUpdate::default()
    };
    let u = store.update_user_settings(&user.id, &change).await.unwrap();
    assert_eq!(u.alerted.budget, Some(at(30)));
    let nobody = UserId::new("usr_nobody");
    assert!(!store
        .swap_alert_mark(&nobody, AlertKind::Balance, None, Some(at(1)))
        .await
        .unwrap());
}

/// Of many hosts taking the same mark at once, exactly one wins.
pub async fn concurrent_alert_mark_has_one_winner(store: Arc<dyn Store>) {
    let user = new_user("race@example.com", Credits::whole(1));
    store.create_user(&user).await.unwrap();
    let takes = (0..20).map(|i| {
        let (store, id) = (store.clone(), user.id.clone());
        tokio::spawn(async move {
            store
                .swap_alert_mark(&id, AlertKind::Budget, None, Some(at(100 + i)))
                .await
                .unwrap()
        })
    });
    let mut won = 0;
    for t in takes.collect::<Vec<_>>() {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
    let u = store.user(&user.id).await.unwrap();
    assert!(u.alerted.budget.is_some());
}

/// A key's response-cache settings are stored with it, changed one at a
/// time, and left alone by every other change.
pub async fn cache_settings_round_trip_and_change(store: Arc<dyn Store>) {
    let user = new_user("cache@example.com", Credits::whole(1));
    store.create_user(&user).await.unwrap();
    let mut key = new_key(&user, None, at(1));
    key.cache = KeyCacheSettings {
        ttl_secs: Some(600),
        shared: true,
    };
    store.create_api_key(&key).await.unwrap();
    assert_eq!(store.api_key_by_hash(&key.hash).await.unwrap(), key);
    let ttl = ApiKeyUpdate {
        cache_ttl_secs: Some(Some(30)),
        ..ApiKeyUpdate::default()
    };
    let k = store.update_api_key(&key.id, &ttl).await.unwrap();
    assert_eq!(
        k.cache,
        KeyCacheSettings {
            ttl_secs: Some(30),
            shared: true
        }
    );
    let other = ApiKeyUpdate {
        name: Some("renamed".into()),
        tpm: Some(Some(9)),
        ..ApiKeyUpdate::default()
    };
    let k = store.update_api_key(&key.id, &other).await.unwrap();
    assert_eq!(
        k.cache.ttl_secs,
        Some(30),
        "other changes keep the settings"
    );
    let off = ApiKeyUpdate {
        cache_ttl_secs: Some(None),
        cache_shared: Some(false),
        ..ApiKeyUpdate::default()
    };
    let k = store.update_api_key(&key.id, &off).await.unwrap();
    assert_eq!(k.cache, KeyCacheSettings::default());
    assert_eq!(store.api_key_by_hash(&key.hash).await.unwrap(), k);
    assert_eq!(store.api_keys(&user.id).await.unwrap(), vec![k]);
}

/// Rate counters add up within a window, start again in a later one, and
/// leave a later window alone when asked about an earlier one.
pub async fn rate_usage_counts_per_window(store: Arc<dyn Store>) {
    let add = |requests, tokens| RateUsage { requests, tokens };
    let (w1, w2) = (at(60_000), at(120_000));
    assert_eq!(
        store.add_rate_usage("key:a", w1, add(1, 10)).await.unwrap(),
        Some(add(1, 10))
    );
    assert_eq!(
        store.add_rate_usage("key:a", w1, add(4, 0)).await.unwrap(),
        Some(add(5, 10))
    );
    // Scopes are apart.
    assert_eq!(
        store
            .add_rate_usage("account:a", w1, add(2, 2))
            .await
            .unwrap(),
        Some(add(2, 2))
    );
    // A later window starts from zero.
    assert_eq!(
        store.add_rate_usage("key:a", w2, add(3, 30)).await.unwrap(),
        Some(add(3, 30))
    );
    // An earlier one is over: nothing changes.
    assert_eq!(
        store.add_rate_usage("key:a", w1, add(1, 1)).await.unwrap(),
        None
    );
    assert_eq!(
        store.add_rate_usage("key:a", w2, add(0, 0)).await.unwrap(),
        Some(add(3, 30))
    );
}

/// Concurrent additions to one window are each counted once.
pub async fn concurrent_rate_usage_is_atomic(store: Arc<dyn Store>) {
    let w = at(60_000);
    let adds = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let one = RateUsage {
                requests: 1,
                tokens: 5,
            };
            store.add_rate_usage("key:busy", w, one).await.unwrap()
        })
    });
    let mut totals: Vec<u64> = Vec::new();
    for a in adds.collect::<Vec<_>>() {
        totals.push(a.await.unwrap().unwrap().requests);
    }
    totals.sort_unstable();
    // Each addition saw a different total: none was lost or counted twice.
    assert_eq!(totals, (1..=20).collect::<Vec<u64>>());
    let last = store
        .add_rate_usage("key:busy", w, RateUsage::default())
        .await
        .unwrap();
    assert_eq!(
        last,
        Some(RateUsage {
            requests: 20,
            tokens: 100
        })
    );
}
