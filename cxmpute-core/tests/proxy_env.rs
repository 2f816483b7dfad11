//! The broker's HTTP client ignores `HTTP(S)_PROXY`: a proxy would resolve
//! node names itself, around the egress guard's check of every resolution.
//! A binary of its own, because it sets process-wide environment variables.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cxmpute_core::testkit::{TestHost, MODEL};
use cxmpute_core::*;
use serde_json::json;

#[tokio::test]
async fn node_calls_never_go_through_a_proxy_from_the_environment() {
    // A "proxy" that counts the connections it is offered and answers none.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let offered = Arc::new(AtomicUsize::new(0));
    let count = offered.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = proxy.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(sock);
        }
    });
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        std::env::set_var(var, &proxy_url);
    }
    for var in ["NO_PROXY", "no_proxy"] {
        std::env::remove_var(var);
    }
    let h = TestHost::start_market(Credits(500)).await;
    let (_node, _, _) = h.stand_in("direct", Service::Chat, MODEL).await;
    let (_, key) = h.user(Credits::whole(1)).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    // The test's own client must not use the proxy either.
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(key.expose())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        offered.load(Ordering::SeqCst),
        0,
        "a node call went to the proxy"
    );
    h.assert_ledger().await;
}
