//! The one error type of the core, and the result alias every trait uses.

use std::error::Error as StdError;

/// A boxed error from a backend, kept as the source of [`Error::Backend`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Result with the core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the broker, its stores and its traits.
///
/// Variants carry meaning, not mechanism: a store maps "unique constraint
/// failed" to [`Error::AlreadyExists`], a failed credit condition to
/// [`Error::InsufficientCredits`] and so on, and keeps its own error as the
/// source of [`Error::Backend`] where nothing more precise fits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The thing asked for does not exist (or is not visible to the caller).
    #[error("{0} not found")]
    NotFound(String),
    /// The model named is not offered for the route called (no node serves
    /// it, or a node does not run it).
    #[error("model `{0}` not found")]
    ModelNotFound(String),
    /// A create-if-absent found the thing already there.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A concurrent change won; the caller may read again and retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The account's balance does not cover the reservation.
    #[error("insufficient credits: {0}")]
    InsufficientCredits(String),
    /// The API key's own credit limit does not cover the reservation.
    #[error("key credit limit reached: {0}")]
    KeyLimitReached(String),
    /// The API key's spending budget for the day or month does not cover
    /// the reservation (HTTP 429, code `budget_exceeded`).
    #[error("budget exceeded: {0}")]
    BudgetExceeded(String),
    /// Too many requests (rate limits on sign-in codes and the like).
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// A key's or its account's requests or tokens per minute are used up
    /// until `retry_after` (HTTP 429, code `rate_limit_exceeded`).
    #[error("rate limit exceeded: {message}")]
    RateLimitExceeded {
        /// What was exceeded, OpenAI's way: the limit, what is used, what was asked.
        message: String,
        /// Whether it is the tokens limit (else the requests limit).
        tokens: bool,
        /// When the limit allows calls again.
        retry_after: std::time::Duration,
    },
    /// Missing, unknown, revoked or expired credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Known caller, but not allowed to do this (suspended, route not permitted, not the owner).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The input is malformed or out of range.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The request body is larger than the configured cap.
    #[error("payload too large: {0}")]
    PayloadTooLarge(String),
    /// No healthy node serves the requested service and model right now.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// Every node tried failed (status, garbage or connection error).
    #[error("upstream failed: {0}")]
    Upstream(String),
    /// Every node tried timed out.
    #[error("upstream timed out: {0}")]
    UpstreamTimeout(String),
    /// The backend is unreachable or overloaded; the same call may succeed later.
    #[error("backend unavailable: {message}")]
    Unavailable {
        /// What was being done.
        message: String,
        /// The backend's own error.
        #[source]
        source: Option<BoxError>,
    },
    /// A call was served but its charge could not be committed, so its
    /// answer was withheld and nothing was charged; the same call may
    /// succeed later.
    #[error("not charged: {0}")]
    NotCharged(String),
    /// Any other backend failure, with its source kept.
    #[error("backend error: {message}")]
    Backend {
        /// What was being done.
        message: String,
        /// The backend's own error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// A backend error with its source kept.
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A retryable "backend unavailable" error with its source kept.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Whether the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::Conflict(_)
                | Error::RateLimited(_)
                | Error::NotCharged(_)
        )
    }
}

impl From<cxmpute_api::Error> for Error {
    /// A value of the API's types that does not parse or is out of range:
    /// invalid input (HTTP 400), worded as the API's types word it.
    fn from(e: cxmpute_api::Error) -> Self {
        match e {
            cxmpute_api::Error::InvalidInput(m) => Error::InvalidInput(m),
            // Future kinds keep their text until they get a variant here.
            other => Error::InvalidInput(other.to_string()),
        }
    }
}
