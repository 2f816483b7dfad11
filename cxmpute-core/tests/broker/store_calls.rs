//! Counts the store calls one gateway request makes: no read to route it,
//! none to authenticate a key held in memory (the first call with a key
//! reads it and its account's suspension). Then, on a store hosts share,
//! one atomic write to admit it and one to settle it; on a store this host
//! owns, none to admit it once its account is held in memory (the first
//! call reads the account and the key's limit) and one to settle it.
//!
//! `InstrumentedStore` is instrumentation around the real `MemoryStore`: it
//! forwards every call unchanged and counts it by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use cxmpute_core::testkit::{test_config, InstrumentedStore, TestHost, MODEL};
use cxmpute_core::*;
use serde_json::json;

/// Makes a plain call, then a streamed one, checking each settled before
/// its body ended and what it asked of the store: `first` for the first
/// call, `each` (for every call) besides.
async fn count_calls(
    store: Arc<InstrumentedStore>,
    config: BrokerConfig,
    first: &[(&'static str, usize)],
    each: &[(&'static str, usize)],
) {
    let h = TestHost::start_with(store.clone(), |b| b.config(config)).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    let mut reads = first.to_vec();
    for stream in [false, true, false, true] {
        let settled_before = h.broker.store().ledger_totals().await.unwrap().settlements;
        store.take_calls();
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream});
        let r = h.post("/v1/chat/completions", &key, &body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        // Even a stream is settled before its body ends.
        let settled = store.inner.ledger_totals().await.unwrap().settlements;
        assert_eq!(settled, settled_before + 1);
        let calls = store.take_calls();
        let expected: BTreeMap<&'static str, usize> = std::mem::take(&mut reads)
            .into_iter()
            .chain(each.iter().copied())
            .collect();
        assert_eq!(calls, expected, "stream: {stream}");
    }
    h.assert_ledger().await;
}

#[tokio::test]
async fn a_gateway_call_writes_once_to_admit_and_once_to_settle_and_reads_its_key_only_once() {
    // Without credit leases: every call reserves (see `admission` for leases).
    let store = Arc::new(InstrumentedStore::new().shared());
    let mut config = test_config();
    config.credit_leases = false;
    let first = [("api_key_by_hash", 1), ("user", 1)];
    count_calls(store, config, &first, &[("reserve", 1), ("settle", 1)]).await;
}

#[tokio::test]
async fn on_a_store_this_host_owns_a_call_is_admitted_from_memory_and_settled_in_one_write() {
    let store = Arc::new(InstrumentedStore::new());
    // The key and its account's suspension (authentication), then the
    // account's balance and the key's limit (admission): once each.
    let first = [("api_key_by_hash", 2), ("user", 2)];
    count_calls(store, test_config(), &first, &[("settle_held", 1)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_arriving_together_with_a_key_not_held_read_it_once() {
    let store = Arc::new(InstrumentedStore::new().shared());
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    // Reads take a while, as on a distant database: the calls pile up.
    store.delay("api_key_by_hash", std::time::Duration::from_millis(50));
    store.take_calls();
    let by_status = crate::common::calls_at_once(&h, &key, 32).await;
    assert_eq!(by_status, [(200, 32)].into_iter().collect());
    let calls = store.take_calls();
    assert_eq!(
        (calls.get("api_key_by_hash"), calls.get("user")),
        (Some(&1), Some(&1)),
        "{calls:?}"
    );
    h.assert_ledger().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_store_this_host_owns_calls_arriving_together_load_their_account_once() {
    let store = Arc::new(InstrumentedStore::new());
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    store.delay("api_key_by_hash", std::time::Duration::from_millis(50));
    store.delay("user", std::time::Duration::from_millis(50));
    store.take_calls();
    let by_status = crate::common::calls_at_once(&h, &key, 32).await;
    assert_eq!(by_status, [(200, 32)].into_iter().collect());
    let calls = store.take_calls();
    // Once for authentication, once for admission.
    assert_eq!(
        (calls.get("api_key_by_hash"), calls.get("user")),
        (Some(&2), Some(&2)),
        "{calls:?}"
    );
    h.assert_ledger().await;
}
