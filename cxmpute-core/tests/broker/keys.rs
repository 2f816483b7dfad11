//! API keys held in memory: a call with a key seen lately makes no store
//! read; a change made on this host applies at once; the memory is trusted
//! for `key_cache_ttl` of the broker's clock, no longer; a flood of unknown
//! keys stays within the table's bounds and the store's.
//!
//! Time moves only by the manual clock; the store is the instrumented one,
//! which counts what the broker asks of it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::{test_config, InstrumentedStore, TestHost, MODEL};
use cxmpute_core::*;

use crate::common::{chat_status, key_changes_apply_at_once};

fn calls(list: &[(&'static str, usize)]) -> BTreeMap<&'static str, usize> {
    list.iter().copied().collect()
}

#[tokio::test]
async fn a_key_is_read_once_then_held_for_its_ttl() {
    // A store hosts share, without credit leases, so that each call's own
    // store calls are the same two (see `store_calls` for a store this host
    // owns).
    let store = Arc::new(InstrumentedStore::new().shared());
    let mut config = test_config();
    config.credit_leases = false;
    let h = TestHost::start_with(store.clone(), |b| b.config(config)).await;
    let ttl = h.broker.config().key_cache_ttl;
    assert_eq!(ttl, Duration::from_secs(1), "the default bound");
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    store.take_calls();

    assert_eq!(chat_status(&h, &key).await, 200);
    let reads = calls(&[("api_key_by_hash", 1), ("user", 1)]);
    let admit_and_settle = calls(&[("reserve", 1), ("settle", 1)]);
    let first = store.take_calls();
    assert_eq!(
        first,
        reads
            .clone()
            .into_iter()
            .chain(admit_and_settle.clone())
            .collect()
    );
    for _ in 0..5 {
        assert_eq!(chat_status(&h, &key).await, 200);
        assert_eq!(store.take_calls(), admit_and_settle, "held in memory");
    }

    // At its ttl the entry is no longer trusted: the next call reads again.
    h.clock.advance(ttl);
    assert_eq!(chat_status(&h, &key).await, 200);
    assert_eq!(store.take_calls(), first);

    // Past half its life, an entry in use is read again in the background:
    // the call itself does not wait for the store, however slow it is.
    store.delay("api_key_by_hash", Duration::from_secs(3600));
    h.clock.advance(ttl / 2);
    let served = tokio::time::timeout(Duration::from_secs(60), chat_status(&h, &key)).await;
    assert_eq!(served.expect("served from memory"), 200);
    h.assert_ledger().await;
}

#[tokio::test]
async fn changes_made_on_this_host_apply_at_once_from_memory() {
    let store = Arc::new(InstrumentedStore::new());
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    key_changes_apply_at_once(&h).await;

    // The refusals come from what the key cache read again, before any
    // reservation: a suspended account or a revoked key costs no write.
    let (user, key) = h.user(Credits::whole(10)).await;
    assert_eq!(chat_status(&h, &key).await, 200);
    let admin = store
        .inner
        .user_by_email("admin@cxmpute.test")
        .await
        .unwrap();
    let a = h.broker.accounts();
    h.broker
        .admin()
        .suspend_user(&admin, &user.id, "test")
        .await
        .unwrap();
    store.take_calls();
    assert_eq!(chat_status(&h, &key).await, 403);
    assert_eq!(
        store.take_calls(),
        calls(&[("api_key_by_hash", 1), ("user", 1)])
    );
    assert_eq!(chat_status(&h, &key).await, 403);
    assert_eq!(store.take_calls(), calls(&[]), "refused from memory");

    h.broker
        .admin()
        .unsuspend_user(&admin, &user.id)
        .await
        .unwrap();
    let id = store.inner.api_key_by_hash(&key.hash()).await.unwrap().id;
    a.revoke_key(&user, &id).await.unwrap();
    store.take_calls();
    assert_eq!(chat_status(&h, &key).await, 401);
    assert_eq!(store.take_calls(), calls(&[("api_key_by_hash", 1)]));
    assert_eq!(chat_status(&h, &key).await, 401);
    assert_eq!(store.take_calls(), calls(&[]), "refused from memory");

    // A key made on this host after someone tried it works at once.
    let chosen = Secret::generate_api_key();
    assert_eq!(chat_status(&h, &chosen).await, 401);
    h.broker
        .admin()
        .ensure_admin("admin@cxmpute.test", Some(chosen.clone()))
        .await
        .unwrap();
    assert_eq!(
        chat_status(&h, &chosen).await,
        402,
        "known (the admin has no credits)"
    );
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_change_made_around_this_host_applies_once_the_ttl_has_passed() {
    let store = Arc::new(InstrumentedStore::new());
    let h = TestHost::start(store.clone()).await;
    let ttl = h.broker.config().key_cache_ttl;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, key) = h.user(Credits::whole(10)).await;
    assert_eq!(chat_status(&h, &key).await, 200);
    // Suspended by another host (here: straight in the store, which no
    // host's memory hears of): refused from memory once the bound has passed.
    let s = Suspension {
        reason: "elsewhere".into(),
        by: "another host".into(),
        at: h.clock.now(),
    };
    store
        .inner
        .set_user_suspended(&user.id, Some(s))
        .await
        .unwrap();
    h.clock.advance(ttl);
    store.take_calls();
    assert_eq!(chat_status(&h, &key).await, 403);
    let c = store.take_calls();
    assert_eq!(
        c,
        calls(&[("api_key_by_hash", 1), ("user", 1)]),
        "read again, no reservation"
    );

    // Unknown keys are remembered for the same bound: a key made elsewhere
    // after someone tried it works here within it.
    let (_, other_key) = h.user(Credits::whole(10)).await;
    let id = store
        .inner
        .api_key_by_hash(&other_key.hash())
        .await
        .unwrap()
        .id;
    let late = Secret::generate_api_key();
    assert_eq!(chat_status(&h, &late).await, 401);
    let k = ApiKey {
        id: ApiKeyId::generate(),
        hash: late.hash(),
        prefix: late.display_prefix(),
        created_at: h.clock.now(),
        ..store
            .inner
            .api_key_by_hash(&other_key.hash())
            .await
            .unwrap()
    };
    store.inner.create_api_key(&k).await.unwrap();
    assert_eq!(
        chat_status(&h, &late).await,
        401,
        "still remembered as unknown"
    );
    h.clock.advance(ttl);
    assert_eq!(chat_status(&h, &late).await, 200);
    // And revoked elsewhere: refused here once the bound has passed.
    store
        .inner
        .revoke_api_key(&id, h.clock.now())
        .await
        .unwrap();
    store
        .inner
        .revoke_api_key(&k.id, h.clock.now())
        .await
        .unwrap();
    h.clock.advance(ttl);
    assert_eq!(chat_status(&h, &late).await, 401);
    assert_eq!(chat_status(&h, &other_key).await, 401);
    h.assert_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_stays_within_the_tables_and_the_stores_bounds() {
    let store = Arc::new(InstrumentedStore::new());
    let mut config = test_config();
    config.key_cache_capacity = 64;
    let h = TestHost::start_with(store.clone(), |b| b.config(config)).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    assert_eq!(chat_status(&h, &key).await, 200);

    // A wrong key sent again and again is answered from memory.
    let wrong = Secret::generate_api_key();
    store.take_calls();
    for _ in 0..10 {
        assert_eq!(chat_status(&h, &wrong).await, 401);
    }
    assert_eq!(store.take_calls(), calls(&[("api_key_by_hash", 1)]));

    // Lookups take a while, as on a distant database, so a flood piles up.
    store.delay("api_key_by_hash", Duration::from_millis(20));
    store.take_calls();
    let h = Arc::new(h);
    let flood: Vec<_> = (0..300)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { chat_status(&h, &Secret::generate_api_key()).await })
        })
        .collect();
    // Meanwhile the known key is served from memory, never waiting in line.
    for _ in 0..5 {
        assert_eq!(chat_status(&h, &key).await, 200);
    }
    for f in flood {
        assert_eq!(f.await.unwrap(), 401);
    }
    let c = store.take_calls();
    assert_eq!(
        c["api_key_by_hash"], 300,
        "one lookup per unknown key: {c:?}"
    );
    assert_eq!(c.get("user"), None);
    let peak = store.peak_in_flight("api_key_by_hash");
    assert!(peak <= 16, "at most 16 lookups at once, saw {peak}");
    let (known, unknown) = h.key_cache_sizes();
    assert!(known <= 64, "{known} known keys held");
    assert!(unknown <= 4, "{unknown} unknown keys held");
    assert_eq!(known, 1, "the user's key is still held");
    assert_eq!(chat_status(&h, &key).await, 200);
    assert_eq!(store.take_calls().get("api_key_by_hash"), None);
    h.assert_ledger().await;
}
