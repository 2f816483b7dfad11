//! The host's connection limits over real sockets (`http::serve`): a head or
//! body that never finishes, an idle connection and connections past the cap
//! are closed or refused, whatever the client does. Timeouts are configured
//! small; each test waits for the server to close the socket (an event), with
//! a generous guard so a regression fails instead of hanging.
//!
//! Then the same host on serving threads of its own
//! ([`ServeConfig::threads`]): calls, streams and money as on one runtime,
//! and a stop that waits for the calls their callers left.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::http::{serve, ServeConfig};
use cxmpute_core::testkit::{Behavior, TestHost, MODEL};
use cxmpute_core::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far longer than any limit configured here: only a server that never
/// closes reaches it.
const GUARD: Duration = Duration::from_secs(30);

/// A broker served with `config` on a loopback port of its own.
async fn served(config: ServeConfig) -> (TestHost, SocketAddr) {
    let h = TestHost::start(Arc::new(MemoryStore::new())).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(h.broker.clone());
    tokio::spawn(serve(listener, app, config, std::future::pending()));
    (h, addr)
}

/// Everything the server sends until it closes the connection (a reset
/// counts as a close).
async fn until_closed(s: &mut TcpStream) -> String {
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(GUARD, read)
        .await
        .expect("the server closes the connection")
}

async fn send(addr: SocketAddr, bytes: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes.as_bytes()).await.unwrap();
    s
}

const HEALTH: &str = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
const CLOSING_HEALTH: &str = "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

#[tokio::test]
async fn a_head_that_never_ends_is_cut_off() {
    let cfg = ServeConfig::default()
        .header_read_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_secs(600));
    let (_h, addr) = served(cfg).await;
    // Many half-sent heads, trickling: every one is closed.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(send(addr, "GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n").await);
    }
    for s in &mut held {
        s.write_all(b"x-b: 2\r\n").await.unwrap();
    }
    for mut s in held {
        let got = until_closed(&mut s).await;
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
    }
}

#[tokio::test]
async fn a_body_that_never_ends_is_refused_and_its_connection_closed() {
    let cfg = ServeConfig::default()
        .body_read_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_secs(600));
    let (_h, addr) = served(cfg).await;
    let head = "POST /v1/auth/code HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 100\r\n\r\n{\"email\"";
    let mut s = send(addr, head).await;
    let got = until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
    let e: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(e["error"]["code"], "invalid_request", "{got}");
    assert!(body.contains("did not arrive"), "{body}");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let cfg = ServeConfig::default()
        .idle_timeout(Duration::from_millis(300))
        .header_read_timeout(Duration::from_secs(600));
    let (_h, addr) = served(cfg).await;
    // Opened and never used.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(until_closed(&mut silent).await, "");
    // Kept alive after an answer, then left alone: the answer, then the close.
    let mut used = send(addr, HEALTH).await;
    let got = until_closed(&mut used).await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("ok"),
        "{got}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_while_the_others_are_open() {
    let cfg = ServeConfig::default()
        .max_connections(2)
        .header_read_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_secs(600));
    let (_h, addr) = served(cfg).await;
    // Two connections hold every slot (accepted in the order they connected).
    let mut a = send(addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n").await;
    let _b = send(addr, "GET /healthz HTTP/1.1\r\n").await;
    for _ in 0..3 {
        let mut extra = send(addr, CLOSING_HEALTH).await;
        let got = until_closed(&mut extra).await;
        assert!(!got.contains(" 200 "), "served past the cap: {got}");
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 503"), "{got}");
        if !got.is_empty() {
            assert!(got.contains("\"code\":\"unavailable\""), "{got}");
        }
    }
    // One of them finishes and closes: its slot serves the next connection.
    a.write_all(b"connection: close\r\n\r\n").await.unwrap();
    assert!(until_closed(&mut a).await.starts_with("HTTP/1.1 200"));
    let mut served_after = false;
    // The slot comes back as the server's task for `a` ends, just after it
    // closed the socket: each try is a full exchange, so a few suffice.
    for _ in 0..100 {
        let mut next = send(addr, CLOSING_HEALTH).await;
        let got = until_closed(&mut next).await;
        if got.starts_with("HTTP/1.1 200") {
            served_after = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(served_after, "a freed slot serves again");
}

/// A market host served on two serving threads, with a chat node.
async fn on_threads() -> (TestHost, cxmpute_core::testkit::StandInNode) {
    let mut h = TestHost::start_market(Credits(500)).await;
    h.serve_with(ServeConfig::default().threads(2)).await;
    let (node, _, _) = h.stand_in("node", Service::Chat, MODEL).await;
    (h, node)
}

#[tokio::test]
async fn on_serving_threads_fifty_of_200_calls_are_served() {
    let (h, _node) = on_threads().await;
    crate::common::fifty_of_200_calls_are_served(&h).await;
}

#[tokio::test]
async fn on_serving_threads_streams_end_whole_and_are_charged() {
    let (h, _node) = on_threads().await;
    let (_, key) = h.user(Credits::whole(10)).await;
    let body = serde_json::json!({"model": MODEL, "stream": true, "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}]});
    let streams = (0..24).map(|_| async {
        let r = h.post("/v1/chat/completions", &key, &body).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    });
    for text in futures::future::join_all(streams).await {
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
    h.assert_settled(24).await;
    h.assert_ledger().await;
}

#[tokio::test]
async fn serving_threads_stop_only_after_the_calls_their_callers_left() {
    let h = TestHost::start_market(Credits(500)).await;
    let (node, provider, _) = h.stand_in("slow", Service::Chat, MODEL).await;
    node.set(Behavior::Slow(Duration::from_millis(500)));
    let (user, key) = h.user(Credits::whole(1)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig::default().threads(2);
    let serving = tokio::spawn(serve(listener, router(h.broker.clone()), config, async {
        let _ = stopped.await;
    }));
    let body = format!(
        r#"{{"model":"{MODEL}","max_tokens":20,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        key.expose(),
        body.len()
    );
    let caller = send(addr, &(head + &body)).await;
    // The node has the call (and takes its time): the caller hangs up, and
    // the host is told to stop.
    tokio::time::timeout(GUARD, node.hit(1))
        .await
        .expect("the call reaches the node");
    drop(caller);
    stop.send(()).unwrap();
    tokio::time::timeout(GUARD, serving)
        .await
        .expect("serve returns")
        .unwrap()
        .unwrap();
    // Nothing to wait for: serve returned only once the call had ended.
    let usage = h.broker.store().usage_records(&user.id, 10).await.unwrap();
    assert_eq!(usage.len(), 1, "the call left by its caller was settled");
    assert!(usage[0].success && usage[0].charged > Credits::ZERO);
    assert_eq!(h.earnings(&provider.id).await, Credits(500));
    h.assert_ledger().await;
}
