//! Test helpers (feature `testkit`): stand-in provider nodes that are real
//! HTTP servers on loopback, and a broker host served on loopback with a
//! manual clock.
//!
//! A [`StandInNode`] answers in OpenAI shape and can be scripted, at any time,
//! to be slow, fail with a status (and a `Retry-After`), hang, cut a stream
//! half-way or send garbage; its health probe answer is scripted apart.
//!
//! Beside them, what many tests share: the models the stand-ins serve
//! ([`MODEL`], [`EMBED`]), the chat price ([`chat_price`]), a mailer that
//! keeps its codes ([`RecordingMailer`]) and the check of an error answer
//! ([`expect_error`]), and a routing index of its own for benchmarks
//! ([`RoutingIndex`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use parking_lot::Mutex;
use serde_json::{json, Value};

mod instrumented;
mod models;
mod routing;
pub use instrumented::InstrumentedStore;
pub use models::{model_chat, model_embedding, wav, Answers, EMBEDDING_DIM, STABLE_TOKENS};
pub use models::{SPEECH_CHARS_PER_SECOND, SPEECH_RATE};
/// The stand-ins' answer state, for the tolerance measurement in the
/// crate's own tests.
#[cfg(test)]
pub(crate) mod models_for_tests {
    pub(crate) use super::models::AnswerState;
}
pub use routing::RoutingIndex;

use crate::broker::{Broker, BrokerConfig};
use crate::clock::ManualClock;
use crate::http::bearer;
use crate::mail::Mailer;
use crate::memory::MemoryStore;
use crate::reward::FlatReward;
use crate::secret::Secret;
use crate::store::Store;
use crate::types::*;
use crate::wire::{ErrorBody, RegisterProvisionRequest, ServedModel, Usage};

/// The chat model tests serve.
pub const MODEL: &str = "llama3.2:3b";
/// The embeddings model tests serve.
pub const EMBED: &str = "nomic-embed-text";

/// The chat price tests charge: 1,000 micro-credits per request, 1 per input
/// token and 2 per output token, for every chat model.
pub fn chat_price() -> PriceEntry {
    PriceEntry {
        service: Service::Chat,
        model: None,
        per_request: Credits(1_000),
        per_million_input_tokens: Credits(1_000_000),
        per_million_output_tokens: Credits(2_000_000),
        per_million_units: Credits::ZERO,
    }
}

/// Asserts that `r` is an OpenAI-shaped error answer with this status and
/// code, and returns its message.
pub async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(r.status().as_u16(), status);
    let e: ErrorBody = r.json().await.expect("OpenAI error JSON");
    assert_eq!(e.error.code.as_deref(), Some(code), "{}", e.error.message);
    e.error.message
}

/// A mailer that keeps the sign-in codes and alerts it is asked to send
/// instead of delivering them, for tests to read as a person reads their
/// mail (tests about delivery use a real server). Clones share the mail.
#[derive(Clone, Default)]
pub struct RecordingMailer(Arc<Mutex<Vec<(String, Mail)>>>);

#[derive(Clone)]
enum Mail {
    Code(String),
    Alert(crate::mail::AlertMail),
}

impl std::fmt::Debug for RecordingMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingMailer").finish_non_exhaustive()
    }
}

impl RecordingMailer {
    /// The last code sent to `email`; panics when none was.
    pub fn last_code(&self, email: &str) -> String {
        self.0
            .lock()
            .iter()
            .rev()
            .find_map(|(to, m)| match m {
                Mail::Code(c) if to == email => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no mail to {email}"))
    }

    /// The alerts sent to `email`, oldest first.
    pub fn alerts(&self, email: &str) -> Vec<crate::mail::AlertMail> {
        self.0
            .lock()
            .iter()
            .filter_map(|(to, m)| match m {
                Mail::Alert(a) if to == email => Some(a.clone()),
                _ => None,
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Mailer for RecordingMailer {
    async fn send_login_code(&self, email: &str, code: &Secret) -> crate::Result<()> {
        let code = Mail::Code(code.expose().to_owned());
        self.0.lock().push((email.to_owned(), code));
        Ok(())
    }

    async fn send_alert(&self, email: &str, alert: &crate::mail::AlertMail) -> crate::Result<()> {
        let alert = Mail::Alert(alert.clone());
        self.0.lock().push((email.to_owned(), alert));
        Ok(())
    }
}

/// What a stand-in node does with the next requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Answer correctly at once.
    Ok,
    /// Wait this long, then answer correctly.
    Slow(Duration),
    /// Answer with this status and an error body.
    Status(u16),
    /// Answer with this status, an error body and a `Retry-After` of this
    /// many seconds.
    StatusRetryAfter(u16, u64),
    /// Never answer.
    Hang,
    /// Stream this many content chunks, then break the connection
    /// (non-streamed requests: send half a body, then break).
    CutStream(usize),
    /// Stream this many content chunks, then go silent forever.
    StallStream(usize),
    /// Answer 200 with bytes that are not what was asked for.
    Garbage,
    /// Refuse the request itself: 400 with an OpenAI error carrying this
    /// message (text a hostile node crafts for users).
    Refuse(String),
    /// Stream one content chunk, then one `data:` line after another,
    /// forever, never ending the event (a hostile node aiming at memory).
    EndlessEvent,
    /// Stream the start of an event, then go silent forever: no event is
    /// ever complete, so nothing can be passed on.
    StallMidEvent,
    /// Stream well-formed content chunks forever, never `[DONE]`.
    EndlessStream,
    /// Stream one well-formed content chunk every so often, forever.
    Drip(Duration),
    /// Stream every chunk and the usage chunk (with the usage set by
    /// [`StandInNode::set_usage`]), then break before `[DONE]`.
    CutAfterUsage,
}

struct NodeState {
    behavior: Mutex<Behavior>,
    heartbeat: Mutex<Behavior>,
    usage: Mutex<Option<Usage>>,
    secret: Mutex<Option<String>>,
    /// Requests received, watched so a test can wait for them.
    hits: tokio::sync::watch::Sender<usize>,
    /// The body of the last call it received.
    last_body: Mutex<Option<Bytes>>,
    name: String,
    /// What its answers are made of.
    answers: Mutex<models::AnswerState>,
    /// Signalled when a broken or stalled answer is dropped by the server,
    /// i.e. when the peer went away.
    abandoned: tokio::sync::Notify,
}

/// Signals `abandoned` when the answer it travels with is dropped.
struct AbandonGuard(Arc<NodeState>);

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        self.0.abandoned.notify_one();
    }
}

/// A listener whose connections send small writes at once (`TCP_NODELAY`):
/// without it a stream's small chunks wait for delayed ACKs (~40 ms each).
fn nodelay(
    l: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    l.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

/// A stand-in provider node: a real HTTP server on `127.0.0.1:0`.
pub struct StandInNode {
    addr: SocketAddr,
    state: Arc<NodeState>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for StandInNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandInNode")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The text chunks a stand-in streams (five tokens).
pub const STREAM_CHUNKS: [&str; 5] = ["Hel", "lo", " from", " the", " node"];

impl StandInNode {
    /// Starts a node that answers correctly, reporting usage of 10 prompt and 5 completion tokens.
    pub async fn start(name: &str) -> Self {
        let state = Arc::new(NodeState {
            behavior: Mutex::new(Behavior::Ok),
            heartbeat: Mutex::new(Behavior::Ok),
            usage: Mutex::new(Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
            })),
            secret: Mutex::new(None),
            hits: tokio::sync::watch::Sender::new(0),
            last_body: Mutex::new(None),
            name: name.to_owned(),
            answers: Mutex::default(),
            abandoned: tokio::sync::Notify::new(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/audio/speech", post(speech))
            .route("/v1/scrape", post(scrape))
            .route("/heartbeat", get(heartbeat))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(nodelay(listener), app).await;
        });
        StandInNode { addr, state, task }
    }

    /// Its base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Scripts what it does next.
    pub fn set(&self, b: Behavior) {
        *self.state.behavior.lock() = b;
    }

    /// Scripts how it answers health probes (`GET /heartbeat`), apart from
    /// its calls: `Ok` answers "ok"; `Slow`, `Hang`, `Status`,
    /// `StatusRetryAfter` and `Garbage` do what they do to calls; the
    /// stream behaviours answer "ok".
    pub fn set_heartbeat(&self, b: Behavior) {
        *self.state.heartbeat.lock() = b;
    }

    /// Sets what its answers are made of (default [`Answers::Fixed`]):
    /// non-streamed chat answers and embeddings follow it.
    pub fn set_answers(&self, a: Answers) {
        self.state.answers.lock().set(a);
    }

    /// Sets the usage it reports (`None`: it reports none, like some servers).
    pub fn set_usage(&self, u: Option<Usage>) {
        *self.state.usage.lock() = u;
    }

    /// Makes it answer 401 to calls without `Authorization: Bearer <secret>`.
    pub fn require_secret(&self, secret: &str) {
        *self.state.secret.lock() = Some(secret.to_owned());
    }

    /// Requests it has received.
    pub fn hits(&self) -> usize {
        *self.state.hits.borrow()
    }

    /// Waits until it has received at least `n` requests.
    pub async fn hit(&self, n: usize) {
        // The sender lives as long as the node, so this cannot fail.
        let _ = self.state.hits.subscribe().wait_for(|h| *h >= n).await;
    }

    /// Waits until a stalled or cut answer of this node was dropped because
    /// its peer (the broker) closed the connection.
    pub async fn abandoned(&self) {
        self.state.abandoned.notified().await;
    }

    /// A URL on loopback where nothing listens (connection refused).
    pub async fn dead_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        format!("http://{addr}")
    }

    /// The JSON body of the last call it received (`None` before any).
    pub fn last_body(&self) -> Option<Value> {
        let body = self.state.last_body.lock().clone()?;
        Some(serde_json::from_slice(&body).expect("the broker sends JSON"))
    }
}

impl Drop for StandInNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks the secret and counts the hit; `Err` is the response to send.
async fn admit(s: &NodeState, h: &HeaderMap) -> Result<Behavior, Response> {
    s.hits.send_modify(|h| *h += 1);
    if let Some(want) = s.secret.lock().clone() {
        if bearer(h).map(|b| b.expose().to_owned()) != Some(want) {
            return Err((StatusCode::UNAUTHORIZED, "unauthorized").into_response());
        }
    }
    let b = s.behavior.lock().clone();
    match misbehave(&b).await {
        Some(r) => Err(r),
        None => Ok(b),
    }
}

/// Waits as `b` says; the answer to send instead of a correct one, if any.
async fn misbehave(b: &Behavior) -> Option<Response> {
    let failure = |code: u16| {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, r#"{"error":{"message":"scripted failure"}}"#).into_response()
    };
    match b {
        Behavior::Slow(d) => tokio::time::sleep(*d).await,
        Behavior::Hang => futures::future::pending::<()>().await,
        Behavior::Status(code) => return Some(failure(*code)),
        Behavior::StatusRetryAfter(code, secs) => {
            let mut r = failure(*code);
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from(*secs));
            return Some(r);
        }
        Behavior::Garbage => return Some((StatusCode::OK, "this is not json\n\n").into_response()),
        Behavior::Refuse(m) => {
            let body = json!({"error": {"message": m, "type": "invalid_request_error"}});
            return Some((StatusCode::BAD_REQUEST, body.to_string()).into_response());
        }
        Behavior::Ok
        | Behavior::CutStream(_)
        | Behavior::StallStream(_)
        | Behavior::EndlessEvent
        | Behavior::StallMidEvent
        | Behavior::EndlessStream
        | Behavior::Drip(_)
        | Behavior::CutAfterUsage => {}
    }
    None
}

async fn heartbeat(State(s): State<Arc<NodeState>>) -> Response {
    let b = s.heartbeat.lock().clone();
    misbehave(&b).await.unwrap_or_else(|| "ok".into_response())
}

fn broken_body(state: &Arc<NodeState>, prefix: Vec<Bytes>, stall: bool) -> Body {
    let head = futures::stream::iter(prefix.into_iter().map(Ok::<_, std::io::Error>));
    let guard = AbandonGuard(state.clone());
    let tail = futures::stream::once(async move {
        let _guard = guard;
        // Give the server a chance to write what came before: returning
        // Pending lets it flush its buffer before the break.
        tokio::time::sleep(Duration::from_millis(10)).await;
        if stall {
            futures::future::pending::<()>().await;
        }
        Err(std::io::Error::other("cut"))
    });
    Body::from_stream(futures::StreamExt::chain(head, tail))
}

async fn chat(State(s): State<Arc<NodeState>>, h: HeaderMap, body: Bytes) -> Response {
    *s.last_body.lock() = Some(body.clone());
    let b = match admit(&s, &h).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = req["model"].as_str().unwrap_or("unknown").to_owned();
    let usage = *s.usage.lock();
    let stream = req["stream"].as_bool().unwrap_or(false);
    if !stream {
        let prompt = req["messages"][0]["content"].as_str().unwrap_or_default();
        let answer = s.answers.lock().chat(prompt);
        let content = answer.unwrap_or_else(|| format!("Hello from {}", s.name));
        let mut v = json!({
            "id": "chatcmpl-standin", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        });
        if let Some(u) = usage {
            v["usage"] = serde_json::to_value(u).unwrap_or(Value::Null);
        }
        let text = v.to_string();
        if let Behavior::CutStream(_) | Behavior::StallStream(_) = b {
            let half = Bytes::from(text[..text.len() / 2].to_owned());
            return (
                StatusCode::OK,
                broken_body(&s, vec![half], matches!(b, Behavior::StallStream(_))),
            )
                .into_response();
        }
        return ([("content-type", "application/json")], text).into_response();
    }
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let mut events: Vec<Bytes> = Vec::new();
    let prompt = req["messages"][0]["content"].as_str().unwrap_or_default();
    let chunks: Vec<String> = match s.answers.lock().chat(prompt) {
        // A word a chunk, as model servers stream tokens.
        Some(text) => (text.split(' ').enumerate())
            .map(|(i, w)| {
                if i == 0 {
                    w.to_owned()
                } else {
                    format!(" {w}")
                }
            })
            .collect(),
        None => STREAM_CHUNKS.iter().map(|c| (*c).to_owned()).collect(),
    };
    for (i, c) in chunks.iter().enumerate() {
        let delta = if i == 0 {
            json!({"role": "assistant", "content": c})
        } else {
            json!({"content": c})
        };
        let ev = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
        events.push(Bytes::from(format!("data: {ev}\n\n")));
    }
    let chunk_event = |c: &str| {
        let ev = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": null}]});
        Bytes::from(format!("data: {ev}\n\n"))
    };
    let forever = |first: Bytes, next: Bytes| {
        let guard = AbandonGuard(s.clone());
        let rest = futures::stream::repeat_with(move || {
            let _ = &guard;
            Ok::<_, std::io::Error>(next.clone())
        });
        Body::from_stream(futures::StreamExt::chain(
            futures::stream::iter([Ok(first)]),
            rest,
        ))
    };
    match b {
        Behavior::EndlessEvent => {
            let line = Bytes::from(format!("data: {}\n", "A".repeat(8 * 1024)));
            let body = forever(chunk_event("Hel"), line);
            return ([("content-type", "text/event-stream")], body).into_response();
        }
        Behavior::StallMidEvent => {
            let start = Bytes::from_static(b"data: {\"id\":\"chatcmpl-standin\",");
            let body = broken_body(&s, vec![start], true);
            return ([("content-type", "text/event-stream")], body).into_response();
        }
        Behavior::EndlessStream => {
            let body = forever(chunk_event("Hel"), chunk_event("lo"));
            return ([("content-type", "text/event-stream")], body).into_response();
        }
        Behavior::Drip(every) => {
            let (first, next) = (chunk_event("Hel"), chunk_event("lo"));
            let guard = AbandonGuard(s.clone());
            let rest = futures::stream::unfold(guard, move |guard| {
                let next = next.clone();
                async move {
                    tokio::time::sleep(every).await;
                    Some((Ok::<_, std::io::Error>(next), guard))
                }
            });
            let body = Body::from_stream(futures::StreamExt::chain(
                futures::stream::iter([Ok(first)]),
                rest,
            ));
            return ([("content-type", "text/event-stream")], body).into_response();
        }
        _ => {}
    }
    let (cut, stall) = match b {
        Behavior::CutStream(n) => (Some(n), false),
        Behavior::StallStream(n) => (Some(n), true),
        _ => (None, false),
    };
    if let Some(n) = cut {
        events.truncate(n);
        return (
            [("content-type", "text/event-stream")],
            broken_body(&s, events, stall),
        )
            .into_response();
    }
    let fin = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    events.push(Bytes::from(format!("data: {fin}\n\n")));
    if let (true, Some(u)) = (include_usage, usage) {
        let ev = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [], "usage": u});
        events.push(Bytes::from(format!("data: {ev}\n\n")));
    }
    if b == Behavior::CutAfterUsage {
        return (
            [("content-type", "text/event-stream")],
            broken_body(&s, events, false),
        )
            .into_response();
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    // Split events across network chunks at odd places, as real servers do.
    let all: Vec<u8> = events.concat();
    let pieces: Vec<Result<Bytes, std::io::Error>> = all
        .chunks(37)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(futures::stream::iter(pieces)),
    )
        .into_response()
}

async fn speech(State(s): State<Arc<NodeState>>, h: HeaderMap, body: Bytes) -> Response {
    *s.last_body.lock() = Some(body.clone());
    if let Err(r) = admit(&s, &h).await {
        return r;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let audio = s
        .answers
        .lock()
        .speech(req["input"].as_str().unwrap_or_default());
    ([("content-type", "audio/wav")], audio).into_response()
}

/// Fetches each URL (plain HTTP on loopback, no egress guard: a test's
/// pages) and returns it as it came, or the canned text of a liar.
async fn scrape(State(s): State<Arc<NodeState>>, h: HeaderMap, body: Bytes) -> Response {
    *s.last_body.lock() = Some(body.clone());
    if let Err(r) = admit(&s, &h).await {
        return r;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let urls: Vec<String> = (req["urls"].as_array().into_iter().flatten())
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect();
    let canned = match &s.answers.lock().answers {
        Answers::Canned(t) => Some(t.clone()),
        _ => None,
    };
    let mut results = Vec::new();
    for url in urls {
        let fetched = match &canned {
            Some(t) => Ok((200, t.clone())),
            None => match reqwest::get(&url).await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    r.text()
                        .await
                        .map(|t| (status, t))
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            },
        };
        results.push(match fetched {
            Ok((status, content)) => {
                json!({"url": url, "success": true, "status": status, "content": content})
            }
            Err(e) => json!({"url": url, "success": false, "error": e}),
        });
    }
    let v = json!({ "results": results });
    ([("content-type", "application/json")], v.to_string()).into_response()
}

async fn embeddings(State(s): State<Arc<NodeState>>, h: HeaderMap, body: Bytes) -> Response {
    *s.last_body.lock() = Some(body.clone());
    if let Err(r) = admit(&s, &h).await {
        return r;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = match &req["input"] {
        Value::Array(a) if a.iter().all(Value::is_string) || a.iter().all(Value::is_array) => {
            a.len()
        }
        _ => 1,
    };
    let texts: Vec<&str> = match &req["input"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(a) => a.iter().map(|t| t.as_str().unwrap_or_default()).collect(),
        _ => Vec::new(),
    };
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let text = texts.get(i).copied().unwrap_or_default();
            match s.answers.lock().embedding(text) {
                Some(v) => json!({"object": "embedding", "index": i, "embedding": v}),
                None => json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, i as f32]}),
            }
        })
        .collect();
    let mut v = json!({"object": "list", "data": data, "model": req["model"]});
    if let Some(u) = *s.usage.lock() {
        v["usage"] = json!({"prompt_tokens": u.prompt_tokens, "total_tokens": u.prompt_tokens});
    }
    ([("content-type", "application/json")], v.to_string()).into_response()
}

/// A broker served on loopback with a manual clock, an admin, and helpers to
/// add users, providers and nodes.
pub struct TestHost {
    /// The broker.
    pub broker: Broker,
    /// Its base URL, e.g. `http://127.0.0.1:41235`.
    pub url: String,
    /// The clock it runs on.
    pub clock: ManualClock,
    /// An admin API key.
    pub admin_key: Secret,
    /// Users made by [`TestHost::user`] with the credits they started with,
    /// for [`TestHost::assert_ledger`].
    users: Mutex<Vec<(UserId, Credits)>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TestHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHost")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The configuration tests use: loopback nodes allowed, short timeouts.
pub fn test_config() -> BrokerConfig {
    let mut c = BrokerConfig::default().allow_private_endpoints();
    c.connect_timeout = Duration::from_secs(2);
    c.first_byte_timeout = Duration::from_millis(1500);
    c.idle_timeout = Duration::from_millis(1500);
    c
}

impl TestHost {
    /// A host on `store` with [`test_config`] and the defaults.
    pub async fn start(store: Arc<dyn Store>) -> Self {
        Self::start_with(store, |b| b).await
    }

    /// A host on `store`, its builder adjusted by `f` (the clock is set after `f`).
    pub async fn start_with(
        store: Arc<dyn Store>,
        f: impl FnOnce(crate::broker::BrokerBuilder) -> crate::broker::BrokerBuilder,
    ) -> Self {
        let clock = ManualClock::default();
        let builder =
            f(Broker::builder(store).config(test_config())).clock(Arc::new(clock.clone()));
        let broker = builder.build().await.expect("build broker");
        let admin_key = match (broker.admin())
            .ensure_admin("admin@cxmpute.test", None)
            .await
            .expect("admin")
        {
            Some(key) => key,
            // A store reopened after a restart already has the admin: give
            // this host a key of its own.
            None => {
                let admin = broker
                    .store()
                    .user_by_email("admin@cxmpute.test")
                    .await
                    .expect("admin");
                (broker.admin())
                    .create_api_key(&admin.id, "test admin", None, Vec::new())
                    .await
                    .expect("key")
                    .1
            }
        };
        let (url, task) = Self::served(&broker, crate::http::ServeConfig::default()).await;
        TestHost {
            broker,
            url,
            clock,
            admin_key,
            users: Mutex::new(Vec::new()),
            task,
        }
    }

    /// Serves the host with `config` from now on, on a new port
    /// ([`TestHost::url`] changes); the old one stops.
    pub async fn serve_with(&mut self, config: crate::http::ServeConfig) {
        let (url, task) = Self::served(&self.broker, config).await;
        self.task.abort();
        (self.url, self.task) = (url, task);
    }

    /// `broker` served on a loopback port of its own, as a host should be
    /// (connection limits, the peer's address): its URL and the task.
    async fn served(
        broker: &Broker,
        config: crate::http::ServeConfig,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let app = crate::http::router(broker.clone());
        let task = tokio::spawn(async move {
            let _ = crate::http::serve(listener, app, config, std::future::pending()).await;
        });
        (format!("http://{addr}"), task)
    }

    /// A host on a fresh memory store that charges [`chat_price`] and pays
    /// providers a flat `reward` a request.
    pub async fn start_market(reward: Credits) -> Self {
        Self::start_market_with(Arc::new(MemoryStore::new()), reward, |b| b).await
    }

    /// [`TestHost::start_market`] on `store`, its builder further adjusted by `f`.
    pub async fn start_market_with(
        store: Arc<dyn Store>,
        reward: Credits,
        f: impl FnOnce(crate::broker::BrokerBuilder) -> crate::broker::BrokerBuilder,
    ) -> Self {
        let h = Self::start_with(store, move |b| {
            f(b.reward_policy(Arc::new(FlatReward(reward))))
        })
        .await;
        (h.broker.admin())
            .put_price(chat_price())
            .await
            .expect("put the chat price");
        h
    }

    /// A POST of `body` as JSON to `path` on this host, with `key` as the
    /// bearer, to add to before sending.
    pub fn post_request(&self, path: &str, key: &Secret, body: &Value) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .bearer_auth(key.expose())
            .json(body)
    }

    /// Sends [`TestHost::post_request`] as it is: the answer.
    pub async fn post(&self, path: &str, key: &Secret, body: &Value) -> reqwest::Response {
        self.post_request(path, key, body)
            .send()
            .await
            .expect("the host answers")
    }

    /// A user holding `credits`, and its API key.
    pub async fn user(&self, credits: Credits) -> (User, Secret) {
        let email = format!(
            "{}@users.test",
            crate::secret::random_token(10).to_lowercase()
        );
        let (u, _, secret) = self
            .broker
            .admin()
            .create_user(&email, credits, false)
            .await
            .expect("create user");
        self.users.lock().push((u.id.clone(), credits));
        (u, secret)
    }

    /// Counts `user` (made elsewhere, e.g. by another host on the same
    /// store, with `start` credits) in [`TestHost::assert_ledger`].
    pub fn track_user(&self, user: &UserId, start: Credits) {
        self.users.lock().push((user.clone(), start));
    }

    /// A provider and its key.
    pub async fn provider(&self) -> (Provider, Secret) {
        let email = format!(
            "{}@providers.test",
            crate::secret::random_token(10).to_lowercase()
        );
        (self.broker.admin())
            .create_provider(&email, None)
            .await
            .expect("create provider")
    }

    /// Registers `node` for `provider`, serving `model` for `service`; the
    /// stand-in then requires the node secret the broker hands out.
    pub async fn add_node(
        &self,
        provider: &Provider,
        node: &StandInNode,
        service: Service,
        model: &str,
    ) -> ProvisionId {
        self.add_node_at(provider, &node.url(), service, model, Some(node))
            .await
    }

    /// Starts a stand-in node named `name` for a new provider, registered to
    /// serve `model` for `service`: the node, the provider and the node's id.
    pub async fn stand_in(
        &self,
        name: &str,
        service: Service,
        model: &str,
    ) -> (StandInNode, Provider, ProvisionId) {
        let node = StandInNode::start(name).await;
        let (provider, _) = self.provider().await;
        let id = self.add_node(&provider, &node, service, model).await;
        (node, provider, id)
    }

    /// Adds `model` for `service` to the catalogue (any tier, no target),
    /// so that nodes may serve it.
    pub async fn offer(&self, service: Service, model: &str) {
        let entry = crate::types::CatalogueModel::new(service, model, 1, 0);
        (self.broker.admin())
            .put_catalogue_model(entry)
            .await
            .expect("add to the catalogue");
    }

    /// Whether requests are routed to node `id` now (see
    /// [`crate::network::Network::node_status`]).
    pub fn is_routable(&self, id: &ProvisionId) -> bool {
        (self.broker.network())
            .node_status(id)
            .is_some_and(|s| s.routable)
    }

    /// Takes node `id` out of routing (`false`) or puts it back (`true`) on
    /// this host, as a health probe's verdict would, without a probe. A test
    /// hook: embedders cannot reach the routing index.
    pub fn set_node_healthy(&self, id: &ProvisionId, healthy: bool) {
        self.broker.pools().set_healthy(id, healthy);
    }

    /// Removes node `id` from this host's routing index and leaves the store
    /// as it is, as when another host deleted it and this one has not
    /// refreshed yet. A test hook, like [`TestHost::set_node_healthy`].
    pub fn unroute_node(&self, id: &ProvisionId) {
        self.broker.pools().remove(id);
    }

    /// The nodes in this host's routing index, routable or not.
    pub fn routed_node_ids(&self) -> Vec<ProvisionId> {
        self.broker.pools().node_ids()
    }

    /// The credits `user` holds now, as stored.
    pub async fn balance(&self, user: &UserId) -> Credits {
        self.broker.store().user(user).await.expect("user").credits
    }

    /// What `provider` has earned so far, as stored.
    pub async fn earnings(&self, provider: &ProviderId) -> Credits {
        let p = self.broker.store().provider(provider).await;
        p.expect("provider").earnings
    }

    /// How many API keys the broker holds in memory: known ones and unknown
    /// ones (see [`BrokerConfig::key_cache_capacity`]).
    pub fn key_cache_sizes(&self) -> (u64, u64) {
        self.broker.inner().keys.sizes()
    }

    /// How many accounts the broker holds in memory to admit calls from (0
    /// on a store hosts share; see [`BrokerConfig::account_capacity`]).
    pub fn accounts_held(&self) -> usize {
        self.broker.inner().admission.accounts_held()
    }

    /// Credit leases this host holds in memory (a store hosts share).
    pub fn leases_held(&self) -> usize {
        self.broker.inner().admission.leases_held()
    }

    /// The usage record of `user`'s latest request.
    pub async fn last_usage(&self, user: &UserId) -> UsageRecord {
        let latest = self.broker.store().usage_records(user, 1).await;
        latest
            .expect("usage records")
            .pop()
            .expect("a usage record")
    }

    /// Checks that `n` settlements (at least) are in the store. An answer is
    /// settled before its body ends, streamed ones included, so a test that
    /// has read the body needs no waiting.
    pub async fn assert_settled(&self, n: u64) {
        let totals = self.broker.store().ledger_totals().await;
        let settlements = totals.expect("ledger totals").settlements;
        assert!(settlements >= n, "{n} settlements never arrived");
    }

    /// Waits until the alert emails settled calls may send are decided (and
    /// sent, or not): they go out in tasks of their own, after the answer.
    pub async fn alerts_done(&self) {
        self.broker.inner().budgets.alerts().idle().await;
    }

    /// Checks that the money adds up once every call has settled: nothing is
    /// held; for each user made by [`TestHost::user`], what it started with
    /// plus its grants minus its balance is what its usage records charged;
    /// for each provider those records name, its earnings are what they
    /// rewarded; the store's totals agree (charged = rewarded + platform). Credit
    /// leases with no call in flight are handed back first.
    pub async fn assert_ledger(&self) {
        // Leases with no call in flight go back, as they would once idle.
        self.broker.inner().admission.upkeep(true).await;
        let store = self.broker.store();
        let totals = store.ledger_totals().await.expect("ledger totals");
        assert_eq!(totals.reserved, Credits::ZERO, "credits are still held");
        let users = self.users.lock().clone();
        let mut rewards: std::collections::BTreeMap<ProviderId, Credits> = Default::default();
        let mut charged = Credits::ZERO;
        for (user, start) in &users {
            let granted: Credits = store
                .credit_grants(user)
                .await
                .expect("grants")
                .iter()
                .fold(*start, |sum, g| sum.saturating_add(g.amount));
            let balance = self.balance(user).await;
            let records = store.usage_records(user, 1_000_000).await.expect("usage");
            let spent = records
                .iter()
                .fold(Credits::ZERO, |s, r| s.saturating_add(r.charged));
            assert_eq!(
                granted.saturating_sub(balance),
                spent,
                "user {user}: granted {granted:?}, balance {balance:?}, charged {spent:?}"
            );
            charged = charged.saturating_add(spent);
            for r in &records {
                assert!(
                    Credits::ZERO <= r.reward && r.reward <= r.charged,
                    "request {}: rewarded {:?} of a charge of {:?}",
                    r.request_id,
                    r.reward,
                    r.charged
                );
                if let Some(p) = &r.provider_id {
                    let e = rewards.entry(p.clone()).or_insert(Credits::ZERO);
                    *e = e.saturating_add(r.reward);
                }
            }
        }
        for (provider, rewarded) in &rewards {
            assert_eq!(
                self.earnings(provider).await,
                *rewarded,
                "provider {provider}"
            );
        }
        let rewarded = rewards
            .values()
            .fold(Credits::ZERO, |s, r| s.saturating_add(*r));
        // When this host's users made every charge, they also made every
        // reward, and the platform kept the rest.
        if charged == totals.charged {
            assert_eq!(totals.rewarded, rewarded, "the store's rewarded total");
            assert_eq!(
                totals.platform(),
                charged.saturating_sub(rewarded),
                "the platform's take"
            );
        }
        assert!(
            totals.rewarded <= totals.charged,
            "rewarded more than charged"
        );
        assert_eq!(
            totals.charged,
            totals.rewarded.saturating_add(totals.platform()),
            "charged = rewarded + platform"
        );
    }

    /// Registers a node at `url` (which may be dead), serving `model` for `service`.
    pub async fn add_node_at(
        &self,
        provider: &Provider,
        url: &str,
        service: Service,
        model: &str,
        node: Option<&StandInNode>,
    ) -> ProvisionId {
        let req = RegisterProvisionRequest {
            endpoint: Some(url.to_owned()),
            services: vec![ServedModel {
                service,
                model: model.to_owned(),
            }],
            device: json!({"gpu": {"memory_mb": 8192}}),
            location: Location::default(),
        };
        let r = self
            .broker
            .network()
            .register_provision(provider, req)
            .await
            .expect("register provision");
        if let Some(n) = node {
            n.require_secret(r.node_secret.expose());
        }
        r.provision_id
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A variable naming a service the test script starts (a DynamoDB server, an
/// SMTP sink, a browser driver, a validator). Its value when set; when unset
/// or empty a notice is printed and the test should skip on `None`, unless
/// `CXMPUTE_REQUIRE_SERVICES=1` (the test script sets it): then it panics, so
/// a missing service fails the run instead of skipping it silently.
pub fn service_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var("CXMPUTE_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "CXMPUTE_REQUIRE_SERVICES=1 but {var} is not set (scripts/test.sh sets it)"
            );
            eprintln!("skipped: {var} is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// The SMTP sink the test script runs: where it listens and the Maildir it
/// delivers to (from `CXMPUTE_TEST_SMTP` and `CXMPUTE_TEST_MAILDIR`, see
/// [`service_env`]).
#[derive(Clone, Debug)]
pub struct SmtpSink {
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The Maildir messages land in.
    pub maildir: std::path::PathBuf,
}

impl SmtpSink {
    /// The sink, when the test script runs one. Makes the Maildir's three
    /// folders: a Maildir that exists but is empty is not completed by the server.
    pub fn from_env() -> Option<SmtpSink> {
        let addr = service_env("CXMPUTE_TEST_SMTP")?;
        let maildir = std::path::PathBuf::from(service_env("CXMPUTE_TEST_MAILDIR")?);
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(sub)).expect("the Maildir");
        }
        let (host, port) = addr
            .rsplit_once(':')
            .expect("CXMPUTE_TEST_SMTP is host:port");
        Some(SmtpSink {
            host: host.to_owned(),
            port: port.parse().expect("CXMPUTE_TEST_SMTP names a port"),
            maildir,
        })
    }

    /// A mailer sending to this sink, configured as an operator would: from
    /// the `CXMPUTE_MAILER` and `CXMPUTE_SMTP_*` settings (plain SMTP).
    pub fn mailer(&self) -> Arc<dyn Mailer> {
        let vars = [
            ("CXMPUTE_MAILER", "smtp".to_owned()),
            ("CXMPUTE_SMTP_HOST", self.host.clone()),
            ("CXMPUTE_SMTP_PORT", self.port.to_string()),
            ("CXMPUTE_SMTP_TLS", "none".to_owned()),
            (
                "CXMPUTE_SMTP_FROM",
                "Cxmpute <no-reply@cxmpute.test>".to_owned(),
            ),
        ];
        let lookup = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        crate::mail::MailerConfig::from_lookup(lookup)
            .expect("SMTP settings")
            .build()
            .expect("an SMTP mailer")
    }

    /// Every message in the Maildir addressed to `to` and not in `seen`
    /// (which it is added to). The server writes a message before it
    /// acknowledges it, so once a send has been answered the mail is on disk.
    pub fn new_mail(
        &self,
        to: &str,
        seen: &mut std::collections::HashSet<std::path::PathBuf>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(rd) = std::fs::read_dir(self.maildir.join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if seen.contains(&p) {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let addressed = text
                    .lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("to:") && l.contains(to));
                if addressed {
                    seen.insert(p);
                    out.push(text);
                }
            }
        }
        out
    }
}

/// The sign-in code a mail carries (the digits after "sign-in code: ").
pub fn sign_in_code(mail: &str) -> Option<String> {
    const LEAD: &str = "sign-in code: ";
    let at = mail.find(LEAD)? + LEAD.len();
    Some(
        mail[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect(),
    )
}
