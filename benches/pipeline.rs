//! One full pipeline pass (authenticate, validate, price, reserve, select,
//! forward over loopback HTTP, meter, settle) against a stand-in node,
//! beside a direct call to the same node: the difference is the broker's
//! overhead.
//!
//! `cargo bench --bench pipeline`

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_main, Criterion};
use cxmpute_core::testkit::{StandInNode, TestHost};
use cxmpute_core::*;

const MODEL: &str = "llama3.2:3b";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (host, node, key, limited) = rt.block_on(async {
        let host = TestHost::start(Arc::new(MemoryStore::new())).await;
        let node = StandInNode::start("bench").await;
        let (p, _) = host.provider().await;
        host.add_node(&p, &node, Service::Chat, MODEL).await;
        let (_, key) = host.user(Credits::whole(1_000_000)).await;
        // A key under rate limits it never reaches: what counting costs.
        let (u, limited) = host.user(Credits::whole(1_000_000)).await;
        let id = host.broker.store().api_keys(&u.id).await.unwrap()[0]
            .id
            .clone();
        let limits = wire::UpdateKeyRequest {
            rpm: Some(Some(100_000_000)),
            tpm: Some(Some(1_000_000_000_000)),
            ..Default::default()
        };
        host.broker.admin().update_key(&id, limits).await.unwrap();
        (host, node, key, limited)
    });
    let body = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16
        }))
        .unwrap(),
    );
    let node_secret = rt.block_on(async {
        let views = host.broker.store().provisions().await.unwrap();
        views[0].node_secret.clone()
    });
    let client = reqwest::Client::new();
    let mut g = c.benchmark_group("pipeline");
    g.bench_function("direct_node_call", |b| {
        b.to_async(&rt).iter(|| async {
            let r = client
                .post(format!("{}/v1/chat/completions", node.url()))
                .bearer_auth(&node_secret)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap()
        })
    });
    g.bench_function("broker_handle_chat", |b| {
        b.to_async(&rt)
            .iter(|| handle_plain(&host, key.clone(), body.clone()))
    });
    g.bench_function("broker_handle_chat_rate_limited", |b| {
        b.to_async(&rt)
            .iter(|| handle_plain(&host, limited.clone(), body.clone()))
    });
    g.bench_function("http_via_host", |b| {
        b.to_async(&rt).iter(|| async {
            let r = client
                .post(format!("{}/v1/chat/completions", host.url))
                .bearer_auth(key.expose())
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap()
        })
    });
    g.finish();
}

// The macros generate undocumented items; the lint is for the library's API.
#[allow(missing_docs)]
mod harness {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(harness::benches);

/// One plain chat call through `Broker::handle` with `key`: its answer's body.
async fn handle_plain(host: &TestHost, key: Secret, body: Bytes) -> Bytes {
    let r = host
        .broker
        .handle(GatewayRequest::new(Some(key), Route::ChatCompletions, body))
        .await
        .unwrap();
    match r {
        GatewayResponse::Complete { body, .. } => body,
        GatewayResponse::Stream { .. } => unreachable!("plain call"),
    }
}
