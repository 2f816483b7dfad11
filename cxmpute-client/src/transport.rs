//! The HTTP/1 transport under the client: hyper's pooled client (TLS through
//! rustls with the `rustls` feature), the answers it gives, and how its
//! failures map to the client's [`Error`].

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::error::{Error, Result, TimeoutPhase};

type BoxError = Box<dyn StdError + Send + Sync>;

#[cfg(feature = "rustls")]
type Tls = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "rustls"))]
type Tls = HttpConnector;

/// The pooled client shared by a [`Client`](crate::Client) and its clones.
pub(crate) type Http = hyper_util::client::legacy::Client<TimedConnect<Tls>, Full<Bytes>>;

/// A pooled HTTP/1 client whose connections (TLS handshake included) take at
/// most `connect_timeout` to open.
pub(crate) fn http(connect_timeout: Duration) -> Result<Http> {
    let mut tcp = HttpConnector::new();
    // Requests are small and their answers awaited: no Nagle delay.
    tcp.set_nodelay(true);
    #[cfg(feature = "rustls")]
    let tls = {
        // The TLS connector checks the scheme itself.
        tcp.enforce_http(false);
        // ring named here rather than taken from the process: an application
        // whose tree turns on a second rustls provider must not make this fail.
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp)
    };
    #[cfg(not(feature = "rustls"))]
    let tls = tcp;
    let connector = TimedConnect {
        inner: tls,
        timeout: connect_timeout,
    };
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            // Idle pooled connections close after the default 90 s.
            .pool_timer(TokioTimer::new())
            .build(connector),
    )
}

/// A connector bounded in time as a whole: hyper's own connect timeout covers
/// TCP only, not the TLS handshake after it.
#[derive(Clone, Debug)]
pub(crate) struct TimedConnect<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower_service::Service<Uri> for TimedConnect<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting timed out",
                )
                .into()),
            }
        })
    }
}

/// An answer's head, with its body still to read.
pub(crate) struct Answer {
    /// The HTTP status.
    pub(crate) status: StatusCode,
    /// The headers.
    pub(crate) headers: HeaderMap,
    body: Incoming,
    /// When the call must be over, body included (the client's timeout), if
    /// its body is bounded by it.
    deadline: Option<Instant>,
}

impl Answer {
    pub(crate) fn new(resp: http::Response<Incoming>, deadline: Option<Instant>) -> Self {
        let (head, body) = resp.into_parts();
        Answer {
            status: head.status,
            headers: head.headers,
            body,
            deadline,
        }
    }

    /// The whole body. Reading it to the end also gives the connection back
    /// to the pool.
    pub(crate) async fn bytes(self) -> Result<Bytes> {
        let reading = self.body.collect();
        let read = match self.deadline {
            Some(d) => tokio::time::timeout_at(d, reading)
                .await
                .map_err(|_| Error::Timeout(TimeoutPhase::Request))?,
            None => reading.await,
        };
        read.map(|b| b.to_bytes()).map_err(body_error)
    }

    /// The body, to read part by part.
    pub(crate) fn into_body(self) -> Incoming {
        self.body
    }
}

/// The error for an exchange that got no answer: a timeout when one caused
/// it (connecting took too long), a connect error when no connection could
/// be made, else a transport error.
pub(crate) fn send_error(e: hyper_util::client::legacy::Error) -> Error {
    if timed_out(&e) {
        Error::Timeout(TimeoutPhase::Request)
    } else if e.is_connect() {
        Error::Connect(Box::new(e))
    } else {
        Error::Transport(Box::new(e))
    }
}

/// The error for a body that broke off.
pub(crate) fn body_error(e: hyper::Error) -> Error {
    Error::Transport(Box::new(e))
}

/// Whether an I/O timeout is among the causes of `e`.
fn timed_out(e: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Appends `s` percent-encoded, as a path segment or a query name or value:
/// every byte but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`)
/// is encoded, so nothing in an id or a value can end its segment, start a
/// query or split a pair.
pub(crate) fn encode(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreserved_characters_go_unencoded() {
        let mut out = String::new();
        encode("a/b?c n.1~x_y-z%é&=+#", &mut out);
        assert_eq!(out, "a%2Fb%3Fc%20n.1~x_y-z%25%C3%A9%26%3D%2B%23");
    }
}
