//! The host on SQLite, the facade's default store: state written through the
//! HTTP API is all there after a clean restart on the same file.

use std::sync::Arc;

use cxmpute::sqlite::SqliteStore;
use cxmpute_core::testkit::{StandInNode, TestHost, MODEL};
use cxmpute_core::*;
use serde_json::json;

fn temp_db() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cxmpute-restart-{}.db", secret::random_token(12)))
}

/// A streamed chat call, read to its end (a stream is settled before its body ends).
async fn chat(h: &TestHost, key: &Secret) -> reqwest::StatusCode {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(key.expose())
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    r.bytes().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_written_through_the_host_survives_a_clean_restart() {
    let path = temp_db();
    let node = StandInNode::start("a").await;

    // First life: a user, a provider with a node, credits, calls, stats.
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let h = TestHost::start(store.clone()).await;
    let (user, key) = h.user(Credits::whole(3)).await;
    h.broker
        .grant_credits(&user.id, Credits::whole(2), "admin", "welcome")
        .await
        .unwrap();
    let (provider, provider_key) = h.provider().await;
    let node_id = h.add_node(&provider, &node, Service::Chat, MODEL).await;
    for _ in 0..3 {
        assert_eq!(chat(&h, &key).await, 200);
    }
    h.broker.shutdown().await.unwrap();
    let before_user = h.broker.store().user(&user.id).await.unwrap();
    let before_provider = h.broker.store().provider(&provider.id).await.unwrap();
    let before_totals = h.broker.store().ledger_totals().await.unwrap();
    let before_usage = h.broker.store().usage_records(&user.id, 10).await.unwrap();
    let day = h.clock.now().day();
    let before_stats = h
        .broker
        .store()
        .stats(&format!("user:{}", user.id), day, day)
        .await
        .unwrap();
    assert_eq!(before_usage.len(), 3);
    assert_eq!(before_totals.settlements, 3);
    assert!(!before_stats.is_empty());
    drop(h);
    store.close().await;
    drop(store);

    // Second life on the same file.
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let h = TestHost::start(store.clone()).await;
    let s = h.broker.store();
    assert_eq!(s.user(&user.id).await.unwrap(), before_user);
    assert_eq!(s.provider(&provider.id).await.unwrap(), before_provider);
    assert_eq!(s.ledger_totals().await.unwrap(), before_totals);
    assert_eq!(s.usage_records(&user.id, 10).await.unwrap(), before_usage);
    assert_eq!(
        s.stats(&format!("user:{}", user.id), day, day)
            .await
            .unwrap(),
        before_stats
    );
    assert_eq!(s.credit_grants(&user.id).await.unwrap().len(), 1);
    assert_eq!(
        s.provision(&node_id).await.unwrap().provider_id,
        provider.id
    );
    // The keys still work, and the node is routable again without re-registering.
    assert!(h
        .broker
        .authenticate_provider(Some(&provider_key))
        .await
        .is_ok());
    assert_eq!(chat(&h, &key).await, 200);
    assert_eq!(s.ledger_totals().await.unwrap().settlements, 4);
    drop(h);
    store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
