//! Serving the router to strangers: [`serve`] runs HTTP/1.1 over a TCP
//! listener with the limits a public host needs, which a bare `axum::serve`
//! does not set, so that connections cannot be held open for free:
//!
//! * the head of a request must arrive within
//!   [`ServeConfig::header_read_timeout`] (hyper's own timer: a slow-loris
//!   head is cut, and hyper answers 408);
//! * its body within [`ServeConfig::body_read_timeout`] of the head, however
//!   it trickles (the handler reading it gets an error and answers 400; the
//!   connection is then closed);
//! * a connection that moves no byte and waits for no answer for
//!   [`ServeConfig::idle_timeout`] is closed (gracefully: an answer in
//!   progress is finished first);
//! * at most [`ServeConfig::max_connections`] are served at once; one more is
//!   answered 503 and closed at once, so a flood of held connections shows
//!   as quick refusals rather than a host that stops answering.
//!
//! Each request carries axum's `ConnectInfo<SocketAddr>` with the peer's
//! address, which the per-client limits (sign-in codes) read.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use super::workers::Workers;

/// The limits [`serve`] puts on every connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeConfig {
    /// Longest wait for the whole head of a request (request line and
    /// headers), counted from when the connection starts waiting for it: its
    /// opening, or the end of its previous answer. Default 30 s.
    pub header_read_timeout: Duration,
    /// Longest time for the whole body of a request to arrive, counted from
    /// its head. Default 60 s, which a 4 MiB body meets at 70 KB/s.
    pub body_read_timeout: Duration,
    /// A connection that has moved no byte for this long while no answer was
    /// pending is closed. Default 20 s. (The header timer runs on an idle
    /// connection too, so the smaller of the two applies.)
    pub idle_timeout: Duration,
    /// Most connections served at once. Each holds a file descriptor: keep
    /// this well under the process's limit (`ulimit -n`), which must also
    /// cover the connections to nodes. Default 1,024.
    pub max_connections: usize,
    /// Threads of its own that serve the connections, each with a
    /// single-threaded tokio runtime; accepted connections are handed to them
    /// in turn, and a call, its connection and its connection to the node
    /// then stay on one thread. 0 (the default) serves each connection as a
    /// task on the caller's runtime. A dedicated host does best with one
    /// per core: on a two-core host that cost about a fifth less CPU per
    /// proxied call than a work-stealing runtime.
    pub threads: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(20),
            max_connections: 1024,
            threads: 0,
        }
    }
}

impl ServeConfig {
    /// Sets [`ServeConfig::header_read_timeout`].
    pub fn header_read_timeout(mut self, d: Duration) -> Self {
        self.header_read_timeout = d;
        self
    }

    /// Sets [`ServeConfig::body_read_timeout`].
    pub fn body_read_timeout(mut self, d: Duration) -> Self {
        self.body_read_timeout = d;
        self
    }

    /// Sets [`ServeConfig::idle_timeout`].
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Sets [`ServeConfig::max_connections`].
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`ServeConfig::threads`].
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }
}

/// What a refused connection is told: OpenAI's error JSON, then the close.
fn too_many_connections() -> Vec<u8> {
    let body = r#"{"error":{"message":"too many connections; try again shortly","type":"service_unavailable","code":"unavailable"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM: when a host or a node should
/// stop. Hand it to [`serve`] as the shutdown future.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Serves `router` on `listener` with the limits of `config` until
/// `shutdown` resolves; then stops accepting, lets every connection finish
/// its answer in progress and returns once all are closed (with
/// [`ServeConfig::threads`], also once the calls whose callers hung up have
/// ended, and the threads are stopped).
///
/// ```no_run
/// # async fn run(broker: cxmpute_core::Broker) -> std::io::Result<()> {
/// use cxmpute_core::http::{serve, ServeConfig};
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// serve(listener, cxmpute_core::router(broker), ServeConfig::default(), async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await
/// # }
/// ```
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    // Waiting for every slot at shutdown takes a `u32` count.
    let max = config
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let slots = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let refusal = too_many_connections();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut workers = match config.threads {
        0 => None,
        n => Some(Workers::start(n)?),
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors or the like: back off
                        // briefly rather than spin on the same error.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(&stream, &refusal);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            router: router.clone(),
            config: config.clone(),
            peer,
            stop: stop_rx.clone(),
            _slot: slot,
        };
        match &mut workers {
            None => {
                tokio::spawn(conn.run(stream));
            }
            // Moved to the serving thread's reactor: registered with this
            // one, its readiness would wake this runtime's thread.
            Some(workers) => match stream.into_std() {
                Ok(stream) => workers.spawn(async move {
                    if let Ok(stream) = TcpStream::from_std(stream) {
                        conn.run(stream).await;
                    }
                }),
                Err(e) => tracing::debug!(error = %e, "handing a connection over failed"),
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it is closed: all slots back means
    // all connections are done.
    let _ = slots.acquire_many(max as u32).await;
    if let Some(workers) = workers {
        workers.stop().await;
    }
    Ok(())
}

/// Errors of one incoming connection (it went away before it was accepted),
/// not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Tells a connection over the cap so, without waiting for it: what it sent
/// already is read first (closing on unread data would reset the connection
/// and lose the answer), then the answer is written if the socket takes it
/// at once, and the connection is closed.
fn refuse(stream: &TcpStream, answer: &[u8]) {
    let mut sink = [0u8; 4096];
    while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
    let _ = stream.try_write(answer);
    tracing::debug!("connection refused: too many open");
}

/// One accepted connection.
struct Connection {
    router: Router,
    config: ServeConfig,
    peer: SocketAddr,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Its place under [`ServeConfig::max_connections`], given back when
    /// the connection is dropped (closed, or never handed over).
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// When a connection last moved a byte (milliseconds since it opened), and
/// how many of its requests wait for their answer.
#[derive(Default)]
struct Activity {
    last_ms: AtomicU64,
    pending: AtomicUsize,
}

impl Activity {
    fn touch(&self, opened: Instant) {
        let ms = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let opened = Instant::now();
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Tracked {
            io: stream,
            activity: activity.clone(),
            opened,
        });
        let (router, peer, body_timeout) = (self.router, self.peer, self.config.body_read_timeout);
        let service_activity = activity.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let pending = Pending::new(service_activity.clone(), opened);
            let deadline = Instant::now() + body_timeout;
            let mut req = req.map(|b| {
                Body::new(DeadlineBody {
                    inner: b,
                    deadline,
                    limit: body_timeout,
                    sleep: None,
                })
            });
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let resp = router.oneshot(req).await;
                drop(pending);
                resp
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout);
        let conn = builder.serve_connection(io, service);
        let mut conn = std::pin::pin!(conn);
        let idle = idle(&activity, opened, self.config.idle_timeout);
        let mut idle = std::pin::pin!(idle);
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = &mut idle, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                changed = self.stop.changed(), if !closing => {
                    if changed.is_err() || *self.stop.borrow() {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Resolves once the connection has been idle for `limit`: no byte moved
/// and no answer pending.
async fn idle(activity: &Activity, opened: Instant, limit: Duration) {
    loop {
        let last = opened + Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        let due = last + limit;
        let now = Instant::now();
        if now >= due {
            if activity.pending.load(Ordering::Relaxed) == 0 {
                return;
            }
            // An answer is being worked on: not idle; look again later.
            tokio::time::sleep_until(now + limit).await;
        } else {
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A request waiting for its answer; the wait ends (and the idle count
/// starts) when this is dropped.
struct Pending {
    activity: Arc<Activity>,
    opened: Instant,
}

impl Pending {
    fn new(activity: Arc<Activity>, opened: Instant) -> Self {
        activity.pending.fetch_add(1, Ordering::Relaxed);
        Pending { activity, opened }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.activity.touch(self.opened);
        self.activity.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection's socket, noting when bytes move.
struct Tracked {
    io: TcpStream,
    activity: Arc<Activity>,
    opened: Instant,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch(this.opened);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch(this.opened);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch(this.opened);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The body did not arrive in time.
#[derive(Debug)]
pub(crate) struct BodyTimeout(Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} s",
            self.0.as_secs_f64()
        )
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that fails once its deadline passes. The timer is made
/// only when the body is not there yet, so a body that arrived with its head
/// (or an empty one) costs nothing.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
