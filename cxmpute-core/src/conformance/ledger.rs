//! Conformance cases of [`LedgerStore`](crate::store::LedgerStore): grants,
//! reservations, settlements and the totals.

use std::sync::Arc;

use crate::error::Error;
use crate::store::Store;
use crate::types::*;

use super::fixtures::*;

// ---- grants -----------------------------------------------------------------

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

// ---- reservations and settlements -------------------------------------------

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

/// A call answered from the response cache is stored as one: charged, no
/// provider, no reward, `cache_hit` kept, on the reservation path and the
/// held one alike; the platform keeps all of its charge.
pub async fn cache_hits_are_recorded_as_such(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let reserved = reservation(&user, &key, Credits::whole(1), at(1));
    store.reserve(&reserved).await.unwrap();
    let mut st = settlement(&reserved, Credits::micros(123), None, at(2));
    st.usage.success = true;
    st.usage.cache_hit = true;
    store.settle(&st).await.unwrap();
    let held = reservation(&user, &key, Credits::whole(1), at(3));
    let mut st2 = settlement(&held, Credits::micros(77), None, at(4));
    st2.usage.success = true;
    st2.usage.cache_hit = true;
    assert_eq!(
        settle_one(&store, &held, &st2).await.unwrap(),
        SettleOutcome::Applied
    );
    for (r, charged) in [(&reserved, 123), (&held, 77)] {
        let rec = store.settlement(&r.request_id).await.unwrap();
        assert!(rec.cache_hit && rec.success);
        assert_eq!(
            (rec.charged, rec.reward),
            (Credits::micros(charged), Credits::ZERO)
        );
        assert_eq!((rec.provider_id, rec.provision_id), (None, None));
    }
    let recent = store.usage_records(&user.id, 10).await.unwrap();
    assert!(recent.iter().all(|u| u.cache_hit), "{recent:?}");
    assert_eq!(
        balance(&store, &user).await,
        Credits::micros(10_000_000 - 200)
    );
    let totals = store.ledger_totals().await.unwrap();
    assert_eq!(
        (totals.charged, totals.rewarded, totals.reserved),
        (Credits::micros(200), Credits::ZERO, Credits::ZERO)
    );
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

// ---- concurrency ------------------------------------------------------------

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

// ---- settlements of calls held in memory -------------------------------------

/// Settles one held call alone (a batch of one), and its one outcome.
async fn settle_one(
    store: &Arc<dyn Store>,
    hold: &Reservation,
    st: &Settlement,
) -> crate::error::Result<SettleOutcome> {
    let mut out = store.settle_held(&[(hold.clone(), st.clone())]).await?;
    assert_eq!(out.len(), 1, "one outcome per call");
    Ok(out.remove(0))
}

/// A settlement whose hold lived in the broker's memory charges the balance
/// and the key, marks the key used, rewards the provider, stores the usage
/// record and adds to the totals with nothing reserved; once.
pub async fn settle_held_charges_rewards_and_records_once(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(6))).await;
    let provider = stored_provider(&store).await;
    let hold = reservation(&user, &key, Credits::whole(5), at(7));
    let st = settlement(
        &hold,
        Credits::micros(3_000_001),
        Some((&provider, Credits::whole(2))),
        at(9),
    );
    assert_eq!(
        settle_one(&store, &hold, &st).await.unwrap(),
        SettleOutcome::Applied
    );
    assert_eq!(balance(&store, &user).await, Credits::micros(6_999_999));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(
        (k.credits_left, k.credit_limit, k.last_used_at),
        (
            Some(Credits::micros(2_999_999)),
            Some(Credits::whole(6)),
            Some(at(7))
        )
    );
    assert_eq!(earnings(&store, &provider).await, Credits::whole(2));
    let mut want = st.usage.clone();
    want.charged = Credits::micros(3_000_001);
    want.reward = Credits::whole(2);
    assert_eq!(store.settlement(&hold.request_id).await.unwrap(), want);
    assert_eq!(
        store.usage_records(&user.id, 10).await.unwrap(),
        vec![want.clone()]
    );
    let totals = LedgerTotals {
        settlements: 1,
        charged: Credits::micros(3_000_001),
        rewarded: Credits::whole(2),
        reserved: Credits::ZERO,
    };
    assert_eq!(store.ledger_totals().await.unwrap(), totals);

    // Again, or with other figures: nothing more.
    assert_eq!(
        settle_one(&store, &hold, &st).await.unwrap(),
        SettleOutcome::AlreadySettled
    );
    let other = settlement(&hold, Credits::ZERO, None, at(10));
    assert_eq!(
        settle_one(&store, &hold, &other).await.unwrap(),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(
        store.settle(&other).await.unwrap(),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(balance(&store, &user).await, Credits::micros(6_999_999));
    assert_eq!(earnings(&store, &provider).await, Credits::whole(2));
    assert_eq!(store.settlement(&hold.request_id).await.unwrap(), want);
    assert_eq!(store.ledger_totals().await.unwrap(), totals);
    // A reservation may not take a settled request's id either.
    assert_err!(store.reserve(&hold).await, Error::AlreadyExists(_));
}

/// A held call's charge is cut to its hold and its reward to the charge; a
/// failed call (nothing charged) still marks the key used and is recorded.
pub async fn settle_held_clamps_charge_and_reward(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let provider = stored_provider(&store).await;
    let hold = reservation(&user, &key, Credits::whole(4), at(1));
    let st = settlement(
        &hold,
        Credits::whole(9),
        Some((&provider, Credits::whole(20))),
        at(2),
    );
    settle_one(&store, &hold, &st).await.unwrap();
    assert_eq!(balance(&store, &user).await, Credits::whole(6));
    assert_eq!(key_left(&store, &key).await, None);
    assert_eq!(earnings(&store, &provider).await, Credits::whole(4));
    let rec = store.settlement(&hold.request_id).await.unwrap();
    assert_eq!(
        (rec.charged, rec.reward),
        (Credits::whole(4), Credits::whole(4))
    );

    let failed = reservation(&user, &key, Credits::whole(6), at(3));
    let st = settlement(
        &failed,
        Credits::ZERO,
        Some((&provider, Credits::whole(1))),
        at(4),
    );
    settle_one(&store, &failed, &st).await.unwrap();
    assert_eq!(balance(&store, &user).await, Credits::whole(6));
    assert_eq!(earnings(&store, &provider).await, Credits::whole(4));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.last_used_at, Some(at(3)));
    let rec = store.settlement(&failed.request_id).await.unwrap();
    assert_eq!((rec.charged, rec.reward), (Credits::ZERO, Credits::ZERO));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.settlements, t.charged, t.rewarded, t.reserved),
        (2, Credits::whole(4), Credits::whole(4), Credits::ZERO)
    );
}

/// A key whose limit was lowered under what a call held is charged down to
/// zero, never below; the balance takes the whole charge.
pub async fn settle_held_never_takes_a_key_below_zero(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(8))).await;
    let hold = reservation(&user, &key, Credits::whole(8), at(1));
    let lower = ApiKeyUpdate {
        credit_limit: Some(Some(Credits::whole(2))),
        ..ApiKeyUpdate::default()
    };
    store.update_api_key(&key.id, &lower).await.unwrap();
    let st = settlement(&hold, Credits::whole(5), None, at(2));
    settle_one(&store, &hold, &st).await.unwrap();
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(
        (k.credits_left, k.credit_limit),
        (Some(Credits::ZERO), Some(Credits::whole(2)))
    );
    assert_eq!(balance(&store, &user).await, Credits::whole(5));
    // Raised again, the key has the limit less what it spent.
    let raise = ApiKeyUpdate {
        credit_limit: Some(Some(Credits::whole(3))),
        ..ApiKeyUpdate::default()
    };
    let k = store.update_api_key(&key.id, &raise).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(1)));
}

/// The id of a reservation open in the store is not a held call's: refused,
/// nothing changes, and the reservation settles as usual.
pub async fn settle_held_of_a_reserved_request_is_refused(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let r = reservation(&user, &key, Credits::whole(3), at(1));
    store.reserve(&r).await.unwrap();
    let st = settlement(&r, Credits::whole(2), None, at(2));
    assert_err!(settle_one(&store, &r, &st).await, Error::AlreadyExists(_));
    assert_eq!(balance(&store, &user).await, Credits::whole(7));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!((t.settlements, t.reserved), (0, Credits::whole(3)));
    assert_eq!(store.settle(&st).await.unwrap(), SettleOutcome::Applied);
    assert_eq!(balance(&store, &user).await, Credits::whole(8));
    // A settlement for another request than the hold's is refused.
    let hold = reservation(&user, &key, Credits::whole(1), at(3));
    assert_err!(settle_one(&store, &hold, &st).await, Error::InvalidInput(_));
}

/// Held settlements leave nothing for the stale-reservation sweep, and the
/// sweep leaves them alone.
pub async fn settle_held_leaves_nothing_to_release(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let hold = reservation(&user, &key, Credits::whole(3), at(1));
    let st = settlement(&hold, Credits::whole(1), None, at(2));
    settle_one(&store, &hold, &st).await.unwrap();
    assert_eq!(
        store.release_stale_reservations(at(1_000)).await.unwrap(),
        0
    );
    let rec = store.settlement(&hold.request_id).await.unwrap();
    assert_eq!(rec.charged, Credits::whole(1));
    assert_eq!(balance(&store, &user).await, Credits::whole(9));
}

/// A batch of held calls of two accounts and two providers, a repeat inside
/// it among them: the outcomes come in order, each call lands once, and
/// every balance, key, earning and total moves by the exact sum; the same
/// batch again changes nothing.
pub async fn settle_held_batch_sums_each_account_and_provider_exactly(store: Arc<dyn Store>) {
    let (a, ka) = funded(&store, Credits::whole(10), Some(Credits::whole(5))).await;
    let (b, kb) = funded(&store, Credits::whole(10), None).await;
    let (p, q) = (stored_provider(&store).await, stored_provider(&store).await);
    let call = |user: &User, key: &ApiKey, charge: i64, to: &Provider, reward: i64, t: i64| {
        let hold = reservation(user, key, Credits::whole(1), at(t));
        let st = settlement(
            &hold,
            Credits(charge),
            Some((to, Credits(reward))),
            at(t + 1),
        );
        (hold, st)
    };
    let a1 = call(&a, &ka, 100_000, &p, 50_000, 1);
    let calls = vec![
        a1.clone(),
        call(&b, &kb, 10_000, &q, 5_000, 2),
        a1.clone(),
        call(&a, &ka, 200_000, &q, 60_000, 3),
        call(&b, &kb, 20_000, &p, 5_000, 4),
        // Charged past its hold: cut to it, and its reward to the charge.
        call(&a, &ka, 3_000_000, &p, 2_000_000, 5),
    ];
    use SettleOutcome::{AlreadySettled, Applied};
    assert_eq!(
        store.settle_held(&calls).await.unwrap(),
        vec![Applied, Applied, AlreadySettled, Applied, Applied, Applied]
    );
    let check = || async {
        let a_paid = 100_000 + 200_000 + 1_000_000;
        assert_eq!(
            balance(&store, &a).await,
            Credits(Credits::whole(10).0 - a_paid)
        );
        assert_eq!(
            key_left(&store, &ka).await,
            Some(Credits(Credits::whole(5).0 - a_paid))
        );
        let k = store.api_key_by_hash(&ka.hash).await.unwrap();
        assert_eq!(k.last_used_at, Some(at(5)), "marked used by its last call");
        assert_eq!(
            balance(&store, &b).await,
            Credits(Credits::whole(10).0 - 30_000)
        );
        assert_eq!(
            earnings(&store, &p).await,
            Credits(50_000 + 5_000 + 1_000_000)
        );
        assert_eq!(earnings(&store, &q).await, Credits(5_000 + 60_000));
        let t = store.ledger_totals().await.unwrap();
        assert_eq!(
            (t.settlements, t.charged, t.rewarded, t.reserved),
            (
                5,
                Credits(a_paid + 30_000),
                Credits(1_055_000 + 65_000),
                Credits::ZERO
            )
        );
        assert_eq!(store.usage_records(&a.id, 10).await.unwrap().len(), 3);
        assert_eq!(store.usage_records(&b.id, 10).await.unwrap().len(), 2);
        let rec = store.settlement(&calls[5].0.request_id).await.unwrap();
        assert_eq!(
            (rec.charged, rec.reward),
            (Credits::whole(1), Credits::whole(1))
        );
    };
    check().await;
    assert_eq!(
        store.settle_held(&calls).await.unwrap(),
        vec![AlreadySettled; calls.len()]
    );
    check().await;
    assert_eq!(store.settle_held(&[]).await.unwrap(), Vec::new());
}

/// A batch with one call that may not settle (the id of an open
/// reservation, a settlement for another request than its hold) is refused
/// whole, nothing of it applied; without that call it settles.
pub async fn settle_held_batch_with_a_refused_call_changes_nothing(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let open = reservation(&user, &key, Credits::whole(2), at(1));
    store.reserve(&open).await.unwrap();
    let fine = reservation(&user, &key, Credits::whole(1), at(2));
    let fine_st = settlement(&fine, Credits::whole(1), None, at(3));
    let open_st = settlement(&open, Credits::whole(1), None, at(3));
    let calls = [(fine.clone(), fine_st.clone()), (open.clone(), open_st)];
    assert_err!(store.settle_held(&calls).await, Error::AlreadyExists(_));
    let crossed = [
        (fine.clone(), fine_st.clone()),
        (open.clone(), fine_st.clone()),
    ];
    assert_err!(store.settle_held(&crossed).await, Error::InvalidInput(_));
    assert_eq!(balance(&store, &user).await, Credits::whole(8));
    assert_err!(store.settlement(&fine.request_id).await, Error::NotFound(_));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!((t.settlements, t.reserved), (0, Credits::whole(2)));
    assert_eq!(
        store.settle_held(&calls[..1]).await.unwrap(),
        vec![SettleOutcome::Applied]
    );
    assert_eq!(balance(&store, &user).await, Credits::whole(7));
}

/// A batch larger than one DynamoDB transaction holds (150 calls of one
/// account, rewarding three providers) lands whole, with exact sums.
pub async fn settle_held_large_batch_lands_whole(store: Arc<dyn Store>) {
    const N: i64 = 150;
    let (user, key) = funded(&store, Credits::whole(100), Some(Credits::whole(50))).await;
    let providers = [
        stored_provider(&store).await,
        stored_provider(&store).await,
        stored_provider(&store).await,
    ];
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let hold = reservation(&user, &key, Credits::whole(1), at(i));
            let to = &providers[usize::try_from(i).unwrap() % 3];
            let st = settlement(
                &hold,
                Credits(10_000 + i),
                Some((to, Credits(1_000))),
                at(N),
            );
            (hold, st)
        })
        .collect();
    let out = store.settle_held(&calls).await.unwrap();
    assert_eq!(out, vec![SettleOutcome::Applied; calls.len()]);
    let charged: i64 = (0..N).map(|i| 10_000 + i).sum();
    assert_eq!(
        balance(&store, &user).await,
        Credits(Credits::whole(100).0 - charged)
    );
    assert_eq!(
        key_left(&store, &key).await,
        Some(Credits(Credits::whole(50).0 - charged))
    );
    for p in &providers {
        assert_eq!(earnings(&store, p).await, Credits(1_000 * N / 3));
    }
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.settlements, t.charged, t.rewarded),
        (N as u64, Credits(charged), Credits(1_000 * N))
    );
    assert_eq!(
        store.usage_records(&user.id, 1_000).await.unwrap().len(),
        N as usize
    );
}

/// 200 concurrent held settlements of one account, key and provider: every
/// one lands, no update is lost.
pub async fn concurrent_held_settles_lose_no_update(store: Arc<dyn Store>) {
    const N: i64 = 200;
    let (user, key) = funded(&store, Credits::whole(1_000), Some(Credits::whole(900))).await;
    let provider = stored_provider(&store).await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let (store, provider) = (store.clone(), provider.clone());
        let hold = reservation(&user, &key, Credits::whole(2), at(i));
        tasks.push(tokio::spawn(async move {
            let charge = Credits::micros(1_000_000 + i);
            let st = settlement(
                &hold,
                charge,
                Some((&provider, Credits::micros(600_000))),
                at(1_000),
            );
            settle_one(&store, &hold, &st).await
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

/// The same held settlement raced by 20 tasks applies exactly once.
pub async fn concurrent_duplicate_held_settles_apply_once(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let provider = stored_provider(&store).await;
    let hold = reservation(&user, &key, Credits::whole(5), at(0));
    let st = settlement(
        &hold,
        Credits::whole(3),
        Some((&provider, Credits::whole(2))),
        at(1),
    );
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (store, hold, st) = (store.clone(), hold.clone(), st.clone());
        tasks.push(tokio::spawn(
            async move { settle_one(&store, &hold, &st).await },
        ));
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

// ---- settlements against credit leases ---------------------------------------

/// Calls settled against a lease take their charges off what the lease
/// holds (never more than it holds), reward, record and count once each;
/// releasing the lease gives the rest back to the balance and the key.
pub async fn settle_leased_charges_the_lease_once(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(6))).await;
    let provider = stored_provider(&store).await;
    let mut lease = reservation(&user, &key, Credits::whole(5), at(1));
    lease.request_id = RequestId::new(format!("lease-{}", lease.request_id));
    store.reserve(&lease).await.unwrap();
    let a = reservation(&user, &key, Credits::whole(2), at(2));
    let b = reservation(&user, &key, Credits::whole(3), at(3));
    let c = reservation(&user, &key, Credits::whole(2), at(4));
    let sa = settlement(
        &a,
        Credits::micros(1_500_000),
        Some((&provider, Credits::whole(1))),
        at(5),
    );
    let sb = settlement(
        &b,
        Credits::whole(3),
        Some((&provider, Credits::whole(1))),
        at(6),
    );
    // More than the lease still holds (0.5): cut to it, the reward too.
    let sc = settlement(
        &c,
        Credits::whole(2),
        Some((&provider, Credits::whole(2))),
        at(7),
    );
    let calls = vec![
        (a.clone(), sa.clone()),
        (b.clone(), sb.clone()),
        (a.clone(), sa.clone()),
        (c.clone(), sc.clone()),
    ];
    assert_eq!(
        store
            .settle_leased(&lease.request_id, &calls)
            .await
            .unwrap(),
        vec![
            SettleOutcome::Applied,
            SettleOutcome::Applied,
            SettleOutcome::AlreadySettled,
            SettleOutcome::Applied
        ]
    );
    // The balance and the key gave the lease up when it was reserved.
    assert_eq!(balance(&store, &user).await, Credits::whole(5));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(1)));
    assert_eq!(
        earnings(&store, &provider).await,
        Credits::micros(2_500_000)
    );
    let rc = store.settlement(&c.request_id).await.unwrap();
    assert_eq!(
        (rc.charged, rc.reward),
        (Credits::micros(500_000), Credits::micros(500_000))
    );
    assert_eq!(
        store.settlement(&a.request_id).await.unwrap().charged,
        Credits::micros(1_500_000)
    );
    let totals = LedgerTotals {
        settlements: 3,
        charged: Credits::whole(5),
        rewarded: Credits::micros(2_500_000),
        reserved: Credits::ZERO,
    };
    assert_eq!(store.ledger_totals().await.unwrap(), totals);

    // Again: nothing more.
    assert_eq!(
        store
            .settle_leased(&lease.request_id, &calls[..2])
            .await
            .unwrap(),
        vec![SettleOutcome::AlreadySettled; 2]
    );
    assert_eq!(store.ledger_totals().await.unwrap(), totals);
    assert_eq!(
        earnings(&store, &provider).await,
        Credits::micros(2_500_000)
    );

    // A call of another key is refused, changing nothing.
    let (other, other_key) = funded(&store, Credits::whole(1), None).await;
    let d = reservation(&other, &other_key, Credits::whole(1), at(8));
    let sd = settlement(&d, Credits::whole(1), None, at(9));
    assert_err!(
        store
            .settle_leased(&lease.request_id, &[(d.clone(), sd)])
            .await,
        Error::InvalidInput(_)
    );

    // Released (settled at zero): an empty lease gives nothing back and
    // is closed for good.
    let release = crate::store_support::release_settlement(&lease, at(10));
    assert_eq!(
        store.settle(&release).await.unwrap(),
        SettleOutcome::Applied
    );
    assert_eq!(balance(&store, &user).await, Credits::whole(5));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!((t.charged, t.reserved), (Credits::whole(5), Credits::ZERO));
    let e = reservation(&user, &key, Credits::whole(1), at(11));
    let se = settlement(&e, Credits::whole(1), None, at(12));
    assert_err!(
        store.settle_leased(&lease.request_id, &[(e, se)]).await,
        Error::NotFound(_)
    );
}

/// What a lease still holds goes back to the balance and the key when it
/// is released, and when the stale sweep takes it (its host died).
pub async fn settle_leased_rest_returns_on_release_and_sweep(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(8))).await;
    let first = reservation(&user, &key, Credits::whole(4), at(1));
    let second = reservation(&user, &key, Credits::whole(4), at(100));
    store.reserve(&first).await.unwrap();
    store.reserve(&second).await.unwrap();
    assert_eq!(balance(&store, &user).await, Credits::whole(2));
    // The sum of leases never exceeds the balance, nor the key's limit.
    let third = reservation(&user, &key, Credits::whole(1), at(101));
    assert_err!(store.reserve(&third).await, Error::KeyLimitReached(_));

    let a = reservation(&user, &key, Credits::whole(2), at(2));
    let sa = settlement(&a, Credits::whole(1), None, at(3));
    store
        .settle_leased(&first.request_id, &[(a, sa)])
        .await
        .unwrap();
    let b = reservation(&user, &key, Credits::whole(2), at(102));
    let sb = settlement(&b, Credits::whole(2), None, at(103));
    store
        .settle_leased(&second.request_id, &[(b, sb)])
        .await
        .unwrap();

    // The first host died: the sweep returns the 3 its lease still held.
    assert_eq!(store.release_stale_reservations(at(50)).await.unwrap(), 1);
    assert_eq!(balance(&store, &user).await, Credits::whole(5));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(3)));
    // The second hands its lease back: 2 more.
    let release = crate::store_support::release_settlement(&second, at(104));
    store.settle(&release).await.unwrap();
    assert_eq!(balance(&store, &user).await, Credits::whole(7));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(5)));
    let t = store.ledger_totals().await.unwrap();
    assert_eq!((t.charged, t.reserved), (Credits::whole(3), Credits::ZERO));
}

/// A lease handed back (settled at zero) or taken by the stale sweep is no
/// request: what it still holds returns to the balance and the key, but it
/// stores no usage record, charges and rewards nothing even if asked to,
/// and is not counted among the ledger's settlements; settling it again is
/// `AlreadySettled`.
pub async fn lease_release_is_no_request(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), Some(Credits::whole(8))).await;
    let provider = stored_provider(&store).await;
    let lease_of = |amount, t| {
        let mut l = reservation(&user, &key, amount, at(t));
        l.request_id = crate::store_support::lease_id();
        assert!(crate::store_support::is_lease(&l.request_id));
        l
    };
    let first = lease_of(Credits::whole(4), 1);
    let second = lease_of(Credits::whole(3), 100);
    store.reserve(&first).await.unwrap();
    store.reserve(&second).await.unwrap();
    let a = reservation(&user, &key, Credits::whole(2), at(2));
    let sa = settlement(
        &a,
        Credits::whole(1),
        Some((&provider, Credits::whole(1))),
        at(3),
    );
    store
        .settle_leased(&first.request_id, &[(a.clone(), sa)])
        .await
        .unwrap();

    // Handed back, with a charge and a reward it is not given.
    let mut back = crate::store_support::release_settlement(&first, at(4));
    back.charged = Credits::whole(3);
    back.reward = Some((provider.id.clone(), Credits::whole(1)));
    assert_eq!(store.settle(&back).await.unwrap(), SettleOutcome::Applied);
    assert_eq!(
        store.settle(&back).await.unwrap(),
        SettleOutcome::AlreadySettled
    );
    // 10 - 3 (the second lease) - 1 (the call).
    assert_eq!(balance(&store, &user).await, Credits::whole(6));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(4)));
    assert_eq!(earnings(&store, &provider).await, Credits::whole(1));
    assert_err!(
        store.settlement(&first.request_id).await,
        Error::NotFound(_)
    );

    // The second lease's host died: the sweep takes it, and no record either.
    assert_eq!(store.release_stale_reservations(at(200)).await.unwrap(), 1);
    assert_eq!(
        store
            .settle(&crate::store_support::release_settlement(&second, at(201)))
            .await
            .unwrap(),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(balance(&store, &user).await, Credits::whole(9));
    let k = store.api_key_by_hash(&key.hash).await.unwrap();
    assert_eq!(k.credits_left, Some(Credits::whole(7)));
    assert_err!(
        store.settlement(&second.request_id).await,
        Error::NotFound(_)
    );

    let records = store.usage_records(&user.id, 10).await.unwrap();
    let ids: Vec<_> = records.iter().map(|u| u.request_id.clone()).collect();
    assert_eq!(ids, vec![a.request_id.clone()]);
    assert_eq!(
        store.ledger_totals().await.unwrap(),
        LedgerTotals {
            settlements: 1,
            charged: Credits::whole(1),
            rewarded: Credits::whole(1),
            reserved: Credits::ZERO,
        }
    );
}

/// A call whose id is an open reservation is refused, and nothing changes.
pub async fn settle_leased_of_a_reserved_request_is_refused(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let lease = reservation(&user, &key, Credits::whole(5), at(1));
    let open = reservation(&user, &key, Credits::whole(1), at(2));
    store.reserve(&lease).await.unwrap();
    store.reserve(&open).await.unwrap();
    let st = settlement(&open, Credits::whole(1), None, at(3));
    assert_err!(
        store
            .settle_leased(&lease.request_id, &[(open.clone(), st)])
            .await,
        Error::AlreadyExists(_)
    );
    let t = store.ledger_totals().await.unwrap();
    assert_eq!((t.settlements, t.reserved), (0, Credits::whole(6)));
}

/// A usage record keeps the model asked for beside the one that served
/// (a fallback or an alias), and `None` reads back as `None`.
pub async fn usage_keeps_the_requested_model(store: Arc<dyn Store>) {
    let (user, key) = funded(&store, Credits::whole(20), None).await;
    let provider = stored_provider(&store).await;
    let mut want = Vec::new();
    for (i, requested) in [Some("fast"), None].into_iter().enumerate() {
        let r = reservation(&user, &key, Credits::whole(1), at(1));
        store.reserve(&r).await.unwrap();
        let mut st = settlement(
            &r,
            Credits(10),
            Some((&provider, Credits(5))),
            at(10 + i as i64),
        );
        st.usage.requested_model = requested.map(str::to_owned);
        assert_eq!(store.settle(&st).await.unwrap(), SettleOutcome::Applied);
        let mut kept = st.usage.clone();
        (kept.charged, kept.reward) = (Credits(10), Credits(5));
        assert_eq!(store.settlement(&r.request_id).await.unwrap(), kept);
        want.insert(0, kept);
    }
    assert_eq!(store.usage_records(&user.id, 10).await.unwrap(), want);
}
