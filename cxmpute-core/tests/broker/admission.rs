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
