//! The client's one error type.

use std::time::Duration;

use cxmpute_api::wire::ErrorDetail;

/// Result with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a call can fail with.
///
/// | variant | when |
/// |---|---|
/// | [`Error::Api`] | the host answered an error status with OpenAI's error JSON (400, 401, 402, 403, 404, 409, 413, 429, 5xx) |
/// | [`Error::Decode`] | the host answered (any status) a body that is not the documented JSON |
/// | [`Error::Stream`] | a stream ended with an error event, or before its end marker |
/// | [`Error::Connect`] | no connection could be made (refused, DNS, TLS handshake) |
/// | [`Error::Timeout`] | a configured timeout ran out |
/// | [`Error::Transport`] | the connection failed after it was made (reset, truncated body) |
/// | [`Error::InvalidRequest`] | the client refused to send the call (a body that cannot be serialized, an id that cannot be a path segment) |
/// | [`Error::Config`] | the client was built with an invalid setting |
///
/// ```no_run
/// use cxmpute_client::{Client, Error};
/// use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
///
/// # async fn run(client: Client) {
/// let req = ChatCompletionRequest::new("llama3.2:3b", vec![ChatMessage::user("hi")]);
/// match client.user().chat(&req).await {
///     Ok(answer) => println!("{:?}", answer.choices[0].message.text()),
///     Err(Error::Api(e)) if e.status == 402 => println!("top up: {}", e.error.message),
///     Err(e) if e.is_retryable() => println!("try again in {:?}", e.retry_after()),
///     Err(e) => println!("failed: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The host refused the call with an error status and OpenAI's error JSON.
    #[error("{0}")]
    Api(Box<ApiError>),
    /// The host answered a body that is not the documented JSON.
    #[error("unexpected answer (HTTP {status}): {source}; body starts with {body:?}")]
    Decode {
        /// The HTTP status of the answer.
        status: u16,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
        /// The start of the body, for diagnosis.
        body: String,
    },
    /// A stream ended with an error event, or ended before its end marker.
    ///
    /// Streams opened fine (HTTP 200), so the failure travels inside them;
    /// `code` is the host's (`stream_interrupted`, ...) or `stream_incomplete`
    /// when the connection closed without `[DONE]`.
    #[error("stream failed: {} ({})", .0.message, .0.code.as_deref().unwrap_or(.0.kind.as_str()))]
    Stream(ErrorDetail),
    /// No connection could be made to the host. The source is the hyper or
    /// I/O error underneath.
    #[error("cannot connect to the host: {}", root_cause(.0.as_ref()))]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A timeout configured on the client ran out.
    #[error("timed out {0}")]
    Timeout(TimeoutPhase),
    /// The connection failed after it was made. The source is the hyper or
    /// I/O error underneath.
    #[error("transport error: {}", root_cause(.0.as_ref()))]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The client refused to send the call: its body cannot be serialized,
    /// or an id cannot be a path segment (empty, `.` or `..`). Nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The client was built with an invalid setting (a base URL that is not a URL...).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

/// Which timeout ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutPhase {
    /// The whole call (connect, send, answer) took longer than the client's timeout.
    Request,
    /// A stream went silent for longer than the client's read timeout.
    StreamIdle,
}

impl std::fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutPhase::Request => "waiting for the answer",
            TimeoutPhase::StreamIdle => "waiting for the next part of a stream",
        })
    }
}

/// An error status from the host, with its parsed OpenAI error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status, e.g. `402`.
    pub status: u16,
    /// The body's `error`: message, `type`, `code`, `param`.
    pub error: ErrorDetail,
    /// The `Retry-After` the host sent, if any.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(code) = &self.error.code {
            write!(f, " {code}")?;
        }
        write!(f, ": {}", self.error.message)
    }
}

impl Error {
    /// The HTTP status, when the host answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api(e) => Some(e.status),
            Error::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The OpenAI error `code` (`insufficient_credits`, `model_not_found`, ...), when there is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api(e) => e.error.code.as_deref(),
            Error::Stream(d) => d.code.as_deref(),
            _ => None,
        }
    }

    /// The `Retry-After` the host asked for, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Api(e) => e.retry_after,
            _ => None,
        }
    }

    /// Whether the same call may succeed later unchanged: rate limits and
    /// unavailability (429 other than a spent quota, 503), and failures to
    /// connect or to hear back in time.
    ///
    /// A 402 or a 429 `insufficient_quota` is not retryable: credits must be
    /// added or a key's limit raised first.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Api(e) => retryable_status(e.status, Some(&e.error.kind)),
            Error::Connect(_) | Error::Timeout(_) => true,
            _ => false,
        }
    }
}

/// Whether a status (with the error `type`, when known) is worth retrying.
pub(crate) fn retryable_status(status: u16, kind: Option<&str>) -> bool {
    match status {
        // A spent key limit is a 429 too, but waiting does not refill it.
        429 => kind != Some("insufficient_quota"),
        503 => true,
        _ => false,
    }
}

/// The last error of `e`'s chain of causes: what actually went wrong
/// (`Connection refused`...), where the first says only where it happened.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, kind: &str) -> Error {
        Error::Api(Box::new(ApiError {
            status,
            error: ErrorDetail {
                message: "m".into(),
                kind: kind.into(),
                code: None,
                param: None,
            },
            retry_after: None,
        }))
    }

    #[test]
    fn only_waitable_failures_are_retryable() {
        assert!(api(429, "rate_limit_error").is_retryable());
        assert!(api(503, "service_unavailable").is_retryable());
        assert!(!api(429, "insufficient_quota").is_retryable());
        assert!(!api(402, "insufficient_quota").is_retryable());
        assert!(!api(400, "invalid_request_error").is_retryable());
        assert!(!api(502, "upstream_error").is_retryable());
    }
}
