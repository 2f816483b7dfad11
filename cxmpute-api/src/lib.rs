//! # cxmpute-api
//!
//! The types of the Cxmpute HTTP API, defined once for both ends of the
//! wire: the host (`cxmpute-core`, which re-exports every item here at the
//! paths it always had) and its clients (`cxmpute-client`).
//!
//! - [`types`]: ids, money ([`Credits`](types::Credits), integer
//!   micro-credits), time, services, routes and the domain records.
//! - [`wire`]: the JSON bodies of requests and answers.
//! - [`analytics`]: the statistics reports of `GET /v1/stats/*`.
//! - [`secret`]: secrets that never print themselves, and their hashes.
//! - [`clock`]: time as a dependency.
//! - [`sse`]: an incremental decoder of server-sent events.
//! - [`retry_after`]: the `Retry-After` header, read once for both sides.
//! - [`Error`]: a value that does not parse or is out of range.
//!
//! Its dependencies are few on purpose: a client that only calls the API
//! builds none of the host. With the `openapi` feature the types also
//! describe themselves to `utoipa`, as the host's OpenAPI document needs.

// Items are `pub` only where a user of the crate can reach them; the rest say `pub(crate)`.
#![warn(unreachable_pub)]

pub mod analytics;
pub mod clock;
mod error;
#[cfg(feature = "openapi")]
mod openapi;
mod retry;
pub mod secret;
pub mod sse;
pub mod types;
pub mod wire;

pub use error::Error;
pub use retry::retry_after;
