//! Admission on a store this host owns (memory here; SQLite in the root's
//! tests): calls are held in memory and only settlements are written, with
//! every money rule of the store's own path. Each case also runs on the same
//! store made to say it is shared, where calls reserve in the store, so both
//! paths are held to the same outcomes.

use std::sync::Arc;

use cxmpute_core::testkit::{InstrumentedStore, TestHost, MODEL};
use cxmpute_core::*;

use crate::common::{
    a_key_limit_holds_under_calls_at_once, fifty_of_200_calls_are_served,
    money_changes_apply_at_once,
};

/// A host on a memory store, owned by it or (`shared`) said to be shared.
async fn host(shared: bool) -> (TestHost, Arc<InstrumentedStore>) {
    let store = match shared {
        true => InstrumentedStore::new().shared(),
        false => InstrumentedStore::new(),
    };
    let store = Arc::new(store);
    (TestHost::start(store.clone()).await, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_calls_against_credits_for_fifty_serve_fifty() {
    for shared in [false, true] {
        let (h, store) = host(shared).await;
        let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
        store.take_calls();
        fifty_of_200_calls_are_served(&h).await;
        let calls = store.take_calls();
        assert_eq!(calls.contains_key("reserve"), shared, "{calls:?}");
        assert_eq!(h.accounts_held() > 0, !shared);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_at_once_on_one_key_never_overspend_its_limit() {
    for shared in [false, true] {
        let (h, _) = host(shared).await;
        let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
        a_key_limit_holds_under_calls_at_once(&h).await;
    }
}

#[tokio::test]
async fn grants_limits_suspensions_and_revocations_apply_at_once() {
    for shared in [false, true] {
        let (h, _) = host(shared).await;
        let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
        money_changes_apply_at_once(&h, &node).await;
    }
}

#[tokio::test]
async fn a_host_holds_at_most_its_capacity_of_idle_accounts() {
    let store = Arc::new(InstrumentedStore::new());
    let mut config = cxmpute_core::testkit::test_config();
    config.account_capacity = 32;
    let h = TestHost::start_with(store.clone(), |b| b.config(config)).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let mut keys = Vec::new();
    for _ in 0..200 {
        let (_, key) = h.user(Credits::whole(1)).await;
        assert_eq!(crate::common::chat_status(&h, &key).await, 200);
        keys.push(key);
    }
    let held = h.accounts_held();
    assert!(held <= 64, "{held} accounts held");
    // An account that went is read again when next used, and still adds up.
    for key in &keys[..10] {
        assert_eq!(crate::common::chat_status(&h, key).await, 200);
    }
    h.assert_ledger().await;
}

/// A host on a memory store said to be shared, admitting from credit leases.
async fn leased_host() -> (TestHost, Arc<InstrumentedStore>) {
    let store = Arc::new(InstrumentedStore::new().shared());
    let mut config = cxmpute_core::testkit::test_config();
    config.credit_leases = true;
    // The clock moves by hours in these tests: the node stays routable.
    config.heartbeat_ttl = std::time::Duration::from_secs(1 << 30);
    let h = TestHost::start_with(store.clone(), |b| b.config(config)).await;
    (h, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_credit_leases_two_hundred_calls_against_credits_for_fifty_serve_fifty() {
    let (h, store) = leased_host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    store.take_calls();
    fifty_of_200_calls_are_served(&h).await;
    let calls = store.take_calls();
    // Settled in batches against leases, never one by one.
    assert_eq!(calls.get("settle_held"), None, "{calls:?}");
    assert!(calls.contains_key("settle_leased"), "{calls:?}");
    let reserves = calls["reserve"];
    assert!(reserves < 200, "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_credit_leases_calls_at_once_on_one_key_never_overspend_its_limit() {
    let (h, _) = leased_host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    a_key_limit_holds_under_calls_at_once(&h).await;
}

#[tokio::test]
async fn a_lease_admits_without_the_store_grows_and_goes_back_when_idle() {
    let (h, store) = leased_host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    crate::common::price_per_call(&h).await;
    let (user, key) = h.user(Credits(100_000)).await;
    // A lease holds what the key spent lately (the clock stands still
    // here: all of it) and one call more, and the next is taken ahead of
    // need once less than half of that is left: leases of 1, 2, 4, 6, 10,
    // 17 and 28 calls' holds, the last taken at the 27th call, cover 31
    // calls and more.
    store.take_calls();
    for _ in 0..31 {
        assert_eq!(crate::common::chat_status(&h, &key).await, 200);
    }
    let calls = store.take_calls();
    assert_eq!(calls.get("reserve"), Some(&7), "{calls:?}");
    assert_eq!(calls.get("settle_leased"), Some(&31), "{calls:?}");
    // The last two leases (8 calls left of 17, and 28) stay on this host
    // while in use ...
    assert_eq!(crate::common::chat_status(&h, &key).await, 200);
    assert_eq!(store.take_calls().get("reserve"), None);
    assert_eq!(h.balance(&user.id).await, Credits(100_000 - 68_000));
    h.broker.run_maintenance().await.unwrap();
    assert_eq!(h.balance(&user.id).await, Credits(100_000 - 68_000));
    // ... and goes back to the account once idle, with the spent ones.
    h.clock.advance(h.broker.config().lease_idle);
    h.broker.run_maintenance().await.unwrap();
    assert_eq!(h.leases_held(), 0);
    assert_eq!(h.balance(&user.id).await, Credits(100_000 - 32_000));
    let t = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!(t.reserved, Credits::ZERO);
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_lease_is_replaced_before_the_stale_sweep_could_take_it() {
    let (h, store) = leased_host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    crate::common::price_per_call(&h).await;
    let (user, key) = h.user(Credits(1_000_000)).await;
    let ttl = h.broker.config().reservation_ttl;
    // Two leases: of one call's hold, then of two (one left).
    for _ in 0..2 {
        assert_eq!(crate::common::chat_status(&h, &key).await, 200);
    }
    // One call every 1/40 of the TTL: the leases never idle, and grow to
    // 64 calls' holds, which would outlive the TTL. Short of it, a lease no
    // longer admits: a new one takes its place and it goes back.
    let step = ttl / 40;
    store.take_calls();
    for _ in 0..130 {
        h.clock.advance(step);
        assert_eq!(crate::common::chat_status(&h, &key).await, 200);
        h.broker.run_maintenance().await.unwrap();
    }
    let calls = store.take_calls();
    // Sizes 2 (taken before), 4, ... 64: five; a renewal takes more.
    assert!(calls.get("reserve").is_some_and(|&n| n > 5), "{calls:?}");
    // Nothing was swept: every call was charged through its lease.
    let t = h.broker.store().ledger_totals().await.unwrap();
    let served = 2 + 130;
    assert_eq!(t.charged, Credits(1_000 * served));
    h.clock.advance(ttl);
    h.broker.run_maintenance().await.unwrap();
    assert_eq!(
        h.balance(&user.id).await,
        Credits(1_000_000 - 1_000 * served)
    );
    h.assert_ledger().await;
}

/// 1,000 calls of one account from 32 clients at once, on a store said to
/// be shared whose calls take a while (200 ms, as a busy remote database's
/// do; moto's transactions took about a second): from credit leases, with
/// settlements in group commits, they cost at most a tenth of a store call
/// each, reads of the key included. (A commit gathers the calls that
/// finished while the one before it ran: the slower the store, the larger
/// the batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_credit_leases_a_thousand_calls_of_one_account_cost_a_tenth_of_a_store_call_each() {
    const CALLS: usize = 1_000;
    let (h, store) = leased_host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    crate::common::price_per_call(&h).await;
    let (_, key) = h.user(Credits::whole(100)).await;
    for call in ["reserve", "settle_leased", "api_key_by_hash", "user"] {
        store.delay(call, std::time::Duration::from_millis(200));
    }
    store.take_calls();
    let h = Arc::new(h);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let (h, key, next) = (h.clone(), key.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < CALLS {
                    assert_eq!(crate::common::chat_status(&h, &key).await, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let calls = store.take_calls();
    let total: usize = calls.values().sum();
    eprintln!("{total} store calls for {CALLS} calls: {calls:?}");
    assert!(total * 10 <= CALLS, "{total} store calls: {calls:?}");
    h.assert_ledger().await;
}
