//! Counts the store calls one gateway request makes: no read to route it,
//! none to authenticate a key held in memory (the first call with a key
//! reads it and its account's suspension), one atomic write to admit it,
//! one to settle it.
//!
//! `InstrumentedStore` is instrumentation around the real `MemoryStore`: it
//! forwards every call unchanged and counts it by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use cxmpute_core::testkit::{InstrumentedStore, TestHost, MODEL};
use cxmpute_core::*;
use serde_json::json;

#[tokio::test]
async fn a_gateway_call_writes_once_to_admit_and_once_to_settle_and_reads_its_key_only_once() {
    let store = Arc::new(InstrumentedStore::new());
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(10)).await;
    // The first call reads the key and its account; later ones hold it.
    let mut reads = vec![("api_key_by_hash", 1), ("user", 1)];
    for stream in [false, true] {
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
            .chain([("reserve", 1), ("settle", 1)])
            .collect();
        assert_eq!(calls, expected, "stream: {stream}");
    }
    h.assert_ledger().await;
}
