//! Error mapping and retries against a tiny scripted server on loopback:
//! each test scripts the answers (statuses, headers, bodies, hangs, streams
//! cut anywhere) and checks the variant the client returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use cxmpute_client::types::ProvisionId;
use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
use cxmpute_client::{Client, Error, RetryPolicy, TimeoutPhase};
use cxmpute_core::testkit::StandInNode;
use futures::StreamExt;
use serde_json::json;

/// What the server does with one request.
#[derive(Clone, Debug)]
enum Reply {
    /// Answer with a status, headers and a body.
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Never answer.
    Hang,
    /// Answer 200 `text/event-stream` with these pieces, one network write
    /// each, then end (or go silent forever when `then_hang`).
    Stream {
        pieces: Vec<Vec<u8>>,
        then_hang: bool,
    },
}

fn answer(status: u16, body: impl Into<String>) -> Reply {
    Reply::Answer {
        status,
        headers: Vec::new(),
        body: body.into(),
    }
}

fn openai_error(status: u16, kind: &str, code: &str) -> Reply {
    answer(status, json!({"error": {"message": format!("{code} said the server"), "type": kind, "code": code}}).to_string())
}

fn with_header(r: Reply, name: &'static str, value: &str) -> Reply {
    match r {
        Reply::Answer {
            status,
            mut headers,
            body,
        } => {
            headers.push((name, value.to_owned()));
            Reply::Answer {
                status,
                headers,
                body,
            }
        }
        other => other,
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

struct Script {
    replies: Mutex<VecDeque<Reply>>,
    /// Repeated once the queue is empty.
    last: Mutex<Option<Reply>>,
    hits: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

/// A scripted server on loopback; it stops when dropped.
struct Server {
    url: String,
    script: Arc<Script>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(replies: Vec<Reply>) -> Server {
        let script = Arc::new(Script {
            replies: Mutex::new(replies.into()),
            last: Mutex::new(None),
            hits: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let s = script.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move {
                    s.reply(Seen {
                        method,
                        path: uri.to_string(),
                        headers,
                        body,
                    })
                    .await
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { url, script, task }
    }

    fn hits(&self) -> usize {
        self.script.hits.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.seen.lock().unwrap().clone()
    }

    /// A client of this server, retrying quickly.
    fn client(&self) -> Client {
        client_of(&self.url)
    }
}

fn client_of(url: &str) -> Client {
    Client::builder()
        .base_url(url)
        .api_key("cx-test")
        .retry(RetryPolicy {
            max_retries: 2,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_secs(30),
        })
        .build()
        .unwrap()
}

impl Script {
    async fn reply(&self, seen: Seen) -> Response {
        self.hits.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push(seen);
        let next = {
            let mut q = self.replies.lock().unwrap();
            let mut last = self.last.lock().unwrap();
            if let Some(r) = q.pop_front() {
                *last = Some(r);
            }
            last.clone().expect("a scripted reply")
        };
        match next {
            Reply::Answer {
                status,
                headers,
                body,
            } => {
                let mut b = Response::builder().status(status);
                for (k, v) in headers {
                    b = b.header(k, v);
                }
                b.body(Body::from(body)).unwrap()
            }
            Reply::Hang => futures::future::pending().await,
            Reply::Stream { pieces, then_hang } => {
                // Yielding between pieces lets each go out as its own write.
                let head = futures::stream::iter(pieces).then(|p| async move {
                    tokio::task::yield_now().await;
                    Ok::<_, std::io::Error>(Bytes::from(p))
                });
                let tail = futures::stream::once(async move {
                    if then_hang {
                        futures::future::pending::<()>().await;
                    }
                    Ok::<_, std::io::Error>(Bytes::new())
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(head.chain(tail)))
                    .unwrap()
            }
        }
    }
}

fn hi() -> ChatCompletionRequest {
    ChatCompletionRequest::new("m", vec![ChatMessage::user("hi")])
}

fn models_json() -> Reply {
    answer(200, r#"{"object":"list","data":[]}"#)
}

fn api(e: Error) -> Box<cxmpute_client::ApiError> {
    match e {
        Error::Api(a) => a,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn error_statuses_carry_the_parsed_openai_body() {
    let s = Server::start(vec![
        openai_error(400, "invalid_request_error", "invalid_request"),
        openai_error(401, "authentication_error", "invalid_api_key"),
        openai_error(402, "insufficient_quota", "insufficient_credits"),
    ])
    .await;
    let c = s.client();
    for (status, kind, code) in [
        (400, "invalid_request_error", "invalid_request"),
        (401, "authentication_error", "invalid_api_key"),
        (402, "insufficient_quota", "insufficient_credits"),
    ] {
        let e = c.user().chat(&hi()).await.unwrap_err();
        assert_eq!(e.code(), Some(code));
        assert!(!e.is_retryable());
        let a = api(e);
        assert_eq!((a.status, a.error.kind.as_str()), (status, kind));
        assert_eq!(a.error.message, format!("{code} said the server"));
        assert_eq!(a.retry_after, None);
    }
    assert_eq!(s.hits(), 3);
}

#[tokio::test]
async fn a_429_keeps_its_retry_after_and_a_post_is_never_retried() {
    let s = Server::start(vec![with_header(
        openai_error(429, "rate_limit_error", "rate_limited"),
        "retry-after",
        "7",
    )])
    .await;
    let e = s.client().user().chat(&hi()).await.unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(api(e).status, 429);
    assert_eq!(
        s.hits(),
        1,
        "a gateway call may have been charged: never retried"
    );
}

#[tokio::test]
async fn a_402_is_not_retried_even_when_idempotent() {
    let s = Server::start(vec![openai_error(
        402,
        "insufficient_quota",
        "insufficient_credits",
    )])
    .await;
    let e = s.client().user().models().await.unwrap_err();
    assert_eq!(e.status(), Some(402));
    assert_eq!(s.hits(), 1);
}

#[tokio::test]
async fn an_idempotent_call_waits_out_429_and_503_then_succeeds() {
    let s = Server::start(vec![
        with_header(
            openai_error(429, "rate_limit_error", "rate_limited"),
            "retry-after",
            "0",
        ),
        with_header(
            openai_error(503, "service_unavailable", "unavailable"),
            "retry-after",
            "0",
        ),
        models_json(),
    ])
    .await;
    let models = s.client().user().models().await.unwrap();
    assert!(models.data.is_empty());
    assert_eq!(s.hits(), 3);
}

#[tokio::test]
async fn a_heartbeat_is_retried_because_it_is_safe_to_repeat() {
    let s = Server::start(vec![
        openai_error(503, "service_unavailable", "unavailable"),
        answer(204, ""),
    ])
    .await;
    s.client()
        .provider()
        .heartbeat(&ProvisionId::new("node_1"))
        .await
        .unwrap();
    assert_eq!(s.hits(), 2);
}

#[tokio::test]
async fn retries_stop_at_the_policy_limit() {
    let s = Server::start(vec![with_header(
        openai_error(503, "service_unavailable", "no_capacity"),
        "retry-after",
        "0",
    )])
    .await;
    let e = s.client().user().models().await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("no_capacity")));
    assert_eq!(s.hits(), 3, "the first attempt and two retries");
    let none = Client::builder()
        .base_url(&s.url)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    none.user().models().await.unwrap_err();
    assert_eq!(s.hits(), 4);
}

#[tokio::test]
async fn a_retry_after_beyond_the_longest_wait_is_returned_at_once() {
    let s = Server::start(vec![with_header(
        openai_error(429, "rate_limit_error", "rate_limited"),
        "retry-after",
        "120",
    )])
    .await;
    let e = s.client().user().models().await.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(120)));
    assert_eq!(s.hits(), 1);
}

#[tokio::test]
async fn a_spent_key_limit_429_is_not_retried() {
    let s = Server::start(vec![openai_error(
        429,
        "insufficient_quota",
        "key_limit_reached",
    )])
    .await;
    let e = s.client().user().models().await.unwrap_err();
    assert!(!e.is_retryable());
    assert_eq!(e.code(), Some("key_limit_reached"));
    assert_eq!(s.hits(), 1);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_decode_error_with_its_status() {
    let s = Server::start(vec![
        answer(200, "this is not json"),
        answer(502, "<html>Bad Gateway</html>"),
        answer(200, r#"{"object":"list"}"#),
    ])
    .await;
    let c = s.client();
    match c.user().chat(&hi()).await.unwrap_err() {
        Error::Decode {
            status: 200, body, ..
        } => assert_eq!(body, "this is not json"),
        other => panic!("expected a decode error, got {other:?}"),
    }
    match c.user().chat(&hi()).await.unwrap_err() {
        Error::Decode {
            status: 502, body, ..
        } => assert!(body.contains("Bad Gateway")),
        other => panic!("expected a decode error, got {other:?}"),
    }
    // JSON, but not the documented shape.
    assert!(matches!(
        c.user().models().await,
        Err(Error::Decode { status: 200, .. })
    ));
}

#[tokio::test]
async fn a_proxy_page_503_is_retried_like_the_hosts_own() {
    let s = Server::start(vec![answer(503, "<html>down</html>"), models_json()]).await;
    s.client().user().models().await.unwrap();
    assert_eq!(s.hits(), 2);
}

#[tokio::test]
async fn a_body_cut_short_is_a_transport_error() {
    // A raw server: it promises 100 bytes, sends 3 and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = sock.read(&mut buf).await;
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a";
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.shutdown().await.unwrap();
    });
    let e = client_of(&url).user().chat(&hi()).await.unwrap_err();
    assert!(matches!(e, Error::Transport(_)), "{e:?}");
    server.await.unwrap();
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let url = StandInNode::dead_url().await;
    let c = client_of(&url);
    let e = c.user().chat(&hi()).await.unwrap_err();
    assert!(matches!(e, Error::Connect(_)), "{e:?}");
    assert!(e.is_retryable() && e.status().is_none());
    // The message says what went wrong, not only where.
    assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    // Retried (a read), then given up with the same variant.
    assert!(matches!(c.user().models().await, Err(Error::Connect(_))));
}

#[cfg(feature = "rustls")]
#[tokio::test]
async fn an_https_host_is_spoken_to_in_tls() {
    // A plain-HTTP server cannot complete a TLS handshake.
    let s = Server::start(vec![models_json()]).await;
    let url = s.url.replacen("http://", "https://", 1);
    let e = client_of(&url).user().models().await.unwrap_err();
    assert!(matches!(e, Error::Connect(_)), "{e:?}");
}

#[cfg(not(feature = "rustls"))]
#[test]
fn an_https_host_needs_the_rustls_feature() {
    let e = Client::builder().base_url("https://h").build().unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
}

#[tokio::test]
async fn a_hanging_host_is_a_timeout() {
    let s = Server::start(vec![Reply::Hang]).await;
    let c = Client::builder()
        .base_url(&s.url)
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let e = c.user().chat(&hi()).await.unwrap_err();
    assert!(matches!(e, Error::Timeout(TimeoutPhase::Request)), "{e:?}");
    let e = c.user().chat_stream(&hi()).await.unwrap_err();
    assert!(matches!(e, Error::Timeout(TimeoutPhase::Request)), "{e:?}");
    // A timed-out read is not retried: the caller's time is spent.
    c.user().models().await.unwrap_err();
    assert_eq!(s.hits(), 3);
}

fn chunk_event(text: &str) -> String {
    let v = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    format!("data: {v}\n\n")
}

/// Splits a text into pieces of `n` bytes (each becomes one network write),
/// cutting through lines and UTF-8 characters alike.
fn split(text: &str, n: usize) -> Vec<Vec<u8>> {
    text.as_bytes().chunks(n).map(<[u8]>::to_vec).collect()
}

#[tokio::test]
async fn events_split_across_network_chunks_decode_whole() {
    let text = format!(
        ": keep-alive\r\n\r\n{}{}data: [DONE]\n\n{}",
        chunk_event("Hel").replace('\n', "\r\n"),
        chunk_event("lo \u{1F600}"),
        chunk_event("after the end is never read"),
    );
    for n in [1, 2, 3, 7, 64] {
        let s = Server::start(vec![Reply::Stream {
            pieces: split(&text, n),
            then_hang: false,
        }])
        .await;
        let chunks: Vec<_> = s
            .client()
            .user()
            .chat_stream(&hi())
            .await
            .unwrap()
            .collect()
            .await;
        let text: String = chunks
            .into_iter()
            .map(|c| c.unwrap().choices[0].delta.content.clone().unwrap())
            .collect();
        assert_eq!(text, "Hello \u{1F600}", "pieces of {n} bytes");
    }
}

#[tokio::test]
async fn the_request_body_is_the_wire_type_with_the_streaming_switches_set() {
    let done = Reply::Stream {
        pieces: vec![b"data: [DONE]\n\n".to_vec()],
        then_hang: false,
    };
    let s = Server::start(vec![answer(200, "{}"), done.clone(), done]).await;
    let c = s.client();
    let mut req = hi();
    req.stream = Some(true);
    req.extra.insert("seed".into(), json!(7));
    // `chat` answers whole whatever the request says; the JSON is not even a completion.
    assert!(matches!(
        c.user().chat(&req).await,
        Err(Error::Decode { .. })
    ));
    assert_eq!(c.user().chat_stream(&hi()).await.unwrap().count().await, 0);
    let mut no_usage = hi();
    no_usage.stream_options = Some(cxmpute_client::wire::StreamOptions {
        include_usage: false,
    });
    c.user().chat_stream(&no_usage).await.unwrap().count().await;
    let bodies: Vec<serde_json::Value> = s
        .seen()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(
        bodies[0],
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 7})
    );
    assert_eq!(bodies[1]["stream"], true);
    assert_eq!(
        bodies[1]["stream_options"],
        json!({"include_usage": true}),
        "usage by default"
    );
    assert_eq!(
        bodies[2]["stream_options"],
        json!({"include_usage": false}),
        "an explicit choice kept"
    );
    assert_eq!(s.seen()[0].headers["content-type"], "application/json");
}

#[tokio::test]
async fn an_error_event_ends_the_stream_with_a_stream_error() {
    let text = format!(
        "{}event: error\ndata: {{\"error\":{{\"message\":\"node lost\",\"type\":\"upstream_error\",\"code\":\"stream_interrupted\"}}}}\n\n{}",
        chunk_event("a"),
        chunk_event("never")
    );
    let s = Server::start(vec![Reply::Stream {
        pieces: split(&text, 5),
        then_hang: false,
    }])
    .await;
    let items: Vec<_> = s
        .client()
        .user()
        .chat_stream(&hi())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 2);
    match &items[1] {
        Err(Error::Stream(d)) => {
            assert_eq!(
                (d.message.as_str(), d.code.as_deref()),
                ("node lost", Some("stream_interrupted"))
            )
        }
        other => panic!("expected a stream error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_closed_before_done_is_incomplete() {
    let s = Server::start(vec![Reply::Stream {
        pieces: vec![chunk_event("a").into()],
        then_hang: false,
    }])
    .await;
    let items: Vec<_> = s
        .client()
        .user()
        .chat_stream(&hi())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 2);
    let e = items.into_iter().nth(1).unwrap().unwrap_err();
    assert_eq!(e.code(), Some("stream_incomplete"));
}

#[tokio::test]
async fn a_garbage_event_is_a_decode_error() {
    let s = Server::start(vec![Reply::Stream {
        pieces: vec!["data: {not json\n\n".into(), chunk_event("never").into()],
        then_hang: false,
    }])
    .await;
    let items: Vec<_> = s
        .client()
        .user()
        .chat_stream(&hi())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 1);
    assert!(
        matches!(items[0], Err(Error::Decode { status: 200, .. })),
        "{items:?}"
    );
}

#[tokio::test]
async fn a_silent_stream_is_an_idle_timeout() {
    let s = Server::start(vec![Reply::Stream {
        pieces: vec![chunk_event("a").into()],
        then_hang: true,
    }])
    .await;
    let c = Client::builder()
        .base_url(&s.url)
        .read_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let items: Vec<_> = c.user().chat_stream(&hi()).await.unwrap().collect().await;
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok());
    assert!(
        matches!(items[1], Err(Error::Timeout(TimeoutPhase::StreamIdle))),
        "{items:?}"
    );
}

#[tokio::test]
async fn a_json_answer_to_a_streamed_call_is_a_decode_error() {
    let s = Server::start(vec![with_header(
        answer(200, r#"{"choices":[]}"#),
        "content-type",
        "application/json",
    )])
    .await;
    let e = s.client().user().chat_stream(&hi()).await.unwrap_err();
    assert!(matches!(e, Error::Decode { status: 200, .. }), "{e:?}");
}

#[tokio::test]
async fn calls_carry_the_credential_the_app_name_and_encoded_ids() {
    let s = Server::start(vec![answer(204, "")]).await;
    let c = Client::builder()
        .base_url(format!("{}/", s.url))
        .api_key("cx-one")
        .app_name("my-app")
        .build()
        .unwrap();
    c.provider()
        .heartbeat(&ProvisionId::new("a/b?c"))
        .await
        .unwrap();
    c.with_bearer("cxp-two")
        .provider()
        .delete(&ProvisionId::new("n.1"))
        .await
        .unwrap();
    c.anonymous()
        .provider()
        .delete(&ProvisionId::new("x"))
        .await
        .unwrap();
    // `.` and `..` cannot be path segments (URLs resolve them away): refused unsent.
    for id in ["", ".", ".."] {
        let e = c
            .provider()
            .delete(&ProvisionId::new(id))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{id:?}: {e:?}");
    }
    assert_eq!(s.hits(), 3);
    let seen = s.seen();
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].path, "/v1/provider/provisions/a%2Fb%3Fc/heartbeat");
    assert_eq!(seen[0].headers["authorization"], "Bearer cx-one");
    assert_eq!(seen[0].headers["x-title"], "my-app");
    assert!(seen[0].headers["user-agent"]
        .to_str()
        .unwrap()
        .starts_with("cxmpute-client/"));
    assert_eq!(seen[1].method, Method::DELETE);
    assert_eq!(seen[1].headers["authorization"], "Bearer cxp-two");
    assert_eq!(seen[1].path, "/v1/provider/provisions/n.1");
    assert!(!seen[2].headers.contains_key("authorization"));
}

#[tokio::test]
async fn a_base_url_under_a_prefix_keeps_the_prefix() {
    let s = Server::start(vec![models_json()]).await;
    client_of(&format!("{}/cxmpute", s.url))
        .user()
        .models()
        .await
        .unwrap();
    assert_eq!(s.seen()[0].path, "/cxmpute/v1/models");
}

#[test]
fn bad_settings_are_config_errors() {
    for url in ["", "not a url", "ftp://host", "mailto:a@b.c"] {
        let e = Client::builder().base_url(url).build().unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
    }
    assert!(matches!(Client::builder().build(), Err(Error::Config(_))));
    let e = Client::builder()
        .base_url("http://h")
        .app_name("bad\nname")
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)));
}

#[test]
fn debug_never_shows_the_credential() {
    let c = Client::new("http://127.0.0.1:1", "cx-very-secret").unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("very-secret"), "{shown}");
    assert!(shown.contains("127.0.0.1:1"));
}
