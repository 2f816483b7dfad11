//! The HTTP client calls are forwarded to nodes with.
//!
//! A call sends a request prepared when its node joined (the URI of each
//! route and the `Authorization` value are made once, see
//! [`Node`](crate::pool::Node)), with the request body's bytes as they were
//! checked. Underneath is the same as reqwest's (which the broker keeps for
//! everything else: probes, fetches): hyper's HTTP/1.1 connection pool,
//! rustls with the webpki roots, the guarded resolver. What reqwest adds per
//! request is left out: it parses the URL twice more (for its redirect
//! policy and its retries, neither used here), builds and merges header
//! maps and passes the request through both layers; a profile of a busy
//! host showed about a tenth of its CPU there.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::egress::{EgressPolicy, GuardedResolver};
use crate::error::{Error, Result};

type Connector = HttpsConnector<HttpConnector<GuardedResolver<EgressPolicy>>>;

/// Why a send failed before the node's response headers.
pub(crate) type SendError = hyper_util::client::legacy::Error;

/// The broker's client to its nodes (cheap to clone: the pools are
/// shared).
///
/// One connection pool per serving thread ([`ServeConfig::threads`]), and
/// one for every other thread: a pooled connection is driven by a task on
/// the runtime that opened it, so a call on one serving thread borrowing
/// another's connection would wake that thread for each read and write.
///
/// [`ServeConfig::threads`]: crate::http::ServeConfig::threads
#[derive(Clone)]
pub(crate) struct NodeClient(Arc<Pools>);

/// Pools made when a thread first sends (most hosts use one or a few).
struct Pools {
    connector: Connector,
    /// `[0]` for threads that are not serving threads; serving thread `i`
    /// uses `1 + (i - 1) % (POOLS - 1)`.
    pools: [OnceLock<Client<Connector, Full<Bytes>>>; POOLS],
}

/// Pools kept: more serving threads than this share them.
const POOLS: usize = 17;

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let made = self.0.pools.iter().filter(|p| p.get().is_some()).count();
        f.debug_struct("NodeClient").field("pools", &made).finish()
    }
}

impl NodeClient {
    /// A client that resolves node names under `egress` and gives up a
    /// connection attempt after `connect_timeout`, set up as the broker's
    /// reqwest client was (no proxy, no redirects, `TCP_NODELAY`, TCP
    /// keep-alive, idle connections kept 90 s).
    pub(crate) fn new(egress: EgressPolicy, connect_timeout: Duration) -> Result<Self> {
        let mut http = HttpConnector::new_with_resolver(GuardedResolver(egress));
        // https:// endpoints are handed to the TLS layer around this one.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        // The provider named, not the process default: another crate in the
        // host may have enabled a second one, which leaves no default.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| Error::backend("setting up TLS for the node client", e))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(NodeClient(Arc::new(Pools {
            connector: https,
            pools: std::array::from_fn(|_| OnceLock::new()),
        })))
    }

    /// The pool of the thread this runs on.
    fn pool(&self) -> &Client<Connector, Full<Bytes>> {
        let slot = match crate::http::workers::index() {
            0 => 0,
            i => 1 + (i - 1) % (POOLS - 1),
        };
        self.0.pools[slot].get_or_init(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(TokioTimer::new())
                .build(self.0.connector.clone())
        })
    }

    /// Sends `body` as a JSON POST to `uri` with `auth` as its
    /// `Authorization` header; resolves with the response's head.
    pub(crate) fn post_json(
        &self,
        uri: Uri,
        auth: HeaderValue,
        body: Bytes,
    ) -> impl std::future::Future<Output = std::result::Result<NodeResponse, SendError>> + Send + 'static
    {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert(AUTHORIZATION, auth);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // What reqwest sent: some servers answer differently without one.
        h.insert(ACCEPT, HeaderValue::from_static("*/*"));
        let sent = self.pool().request(req);
        async move { sent.await.map(NodeResponse) }
    }
}

/// Whether a send failed by timing out (connecting, as a timeout, rather
/// than as an unreachable node).
pub(crate) fn is_timeout(e: &SendError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// A node's response, from its head on.
#[derive(Debug)]
pub(crate) struct NodeResponse(hyper::Response<Incoming>);

/// Why [`NodeResponse::read_capped`] stopped before the end of a body.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The body broke off.
    Failed(hyper::Error),
    /// The body is larger than the cap.
    TooLarge,
    /// No bytes came within the idle timeout.
    Stalled,
}

impl NodeResponse {
    /// The response's status.
    pub(crate) fn status(&self) -> StatusCode {
        self.0.status()
    }

    /// The response's headers.
    pub(crate) fn headers(&self) -> &HeaderMap {
        self.0.headers()
    }

    /// The next piece of the body, `None` at its end (trailers are skipped).
    pub(crate) async fn chunk(&mut self) -> std::result::Result<Option<Bytes>, hyper::Error> {
        loop {
            match self.0.body_mut().frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body, refused once it would pass `cap` bytes or when no
    /// bytes come for `idle` (the rule of `egress::read_capped`, which reads
    /// reqwest's responses). A body that came in one piece is passed on as
    /// it is, without a copy.
    pub(crate) async fn read_capped(
        &mut self,
        cap: usize,
        idle: Duration,
    ) -> std::result::Result<Bytes, ReadError> {
        let mut first: Option<Bytes> = None;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::time::timeout(idle, self.chunk())
                .await
                .map_err(|_| ReadError::Stalled)?
                .map_err(ReadError::Failed)?;
            let Some(c) = chunk else {
                return Ok(match first {
                    Some(only) if buf.is_empty() => only,
                    _ => Bytes::from(buf),
                });
            };
            let have = first.as_ref().map_or(0, Bytes::len) + buf.len();
            if have + c.len() > cap {
                return Err(ReadError::TooLarge);
            }
            match first.take() {
                None if buf.is_empty() => first = Some(c),
                earlier => {
                    if let Some(e) = earlier {
                        buf.extend_from_slice(&e);
                    }
                    buf.extend_from_slice(&c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;

    /// A node stand-in on loopback: `/echo` answers with the request's
    /// `Authorization`, content type and body; `/pieces` with a body in
    /// three pieces.
    async fn node() -> std::net::SocketAddr {
        let app = axum::Router::new()
            .route(
                "/echo",
                post(|headers: HeaderMap, body: Bytes| async move {
                    let h = |n: http::HeaderName| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    format!(
                        "{}|{}|{}",
                        h(AUTHORIZATION),
                        h(CONTENT_TYPE),
                        String::from_utf8_lossy(&body)
                    )
                }),
            )
            .route(
                "/pieces",
                post(|| async {
                    let pieces = ["one,", "two,", "three"]
                        .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p.as_bytes())));
                    axum::body::Body::from_stream(futures::stream::iter(pieces))
                }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        addr
    }

    fn auth() -> HeaderValue {
        HeaderValue::from_static("Bearer node-secret")
    }

    #[tokio::test]
    async fn a_call_reaches_the_node_as_prepared_and_never_through_a_forbidden_name() {
        let addr = node().await;
        let uri: Uri = format!("http://localhost:{}/echo", addr.port())
            .parse()
            .unwrap();
        let body = Bytes::from_static(br#"{"model":"m"}"#);
        let second = Duration::from_secs(5);

        // A name that resolves to loopback is refused under the public-only
        // policy: checked at every resolution, not only at registration.
        let guarded = NodeClient::new(EgressPolicy::PublicOnly, second).unwrap();
        let refused = guarded.post_json(uri.clone(), auth(), body.clone()).await;
        let e = refused.expect_err("connected to loopback through a name");
        assert!(e.is_connect() && !is_timeout(&e), "{e:?}");

        let open = NodeClient::new(EgressPolicy::AllowPrivate, second).unwrap();
        let mut resp = open.post_json(uri, auth(), body).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let answer = resp.read_capped(1 << 10, second).await.unwrap();
        assert_eq!(
            &answer[..],
            br#"Bearer node-secret|application/json|{"model":"m"}"#
        );
    }

    #[tokio::test]
    async fn an_answer_is_read_whole_within_its_cap_and_refused_past_it() {
        let addr = node().await;
        let uri: Uri = format!("http://{addr}/pieces").parse().unwrap();
        let second = Duration::from_secs(5);
        let client = NodeClient::new(EgressPolicy::AllowPrivate, second).unwrap();
        let whole = b"one,two,three".len();

        let mut resp = client
            .post_json(uri.clone(), auth(), Bytes::new())
            .await
            .unwrap();
        let answer = resp.read_capped(whole, second).await.unwrap();
        assert_eq!(&answer[..], b"one,two,three");

        let mut resp = client.post_json(uri, auth(), Bytes::new()).await.unwrap();
        let over = resp.read_capped(whole - 1, second).await;
        assert!(matches!(over, Err(ReadError::TooLarge)), "{over:?}");
    }
}
