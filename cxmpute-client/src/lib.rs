//! # cxmpute-client
//!
//! A typed async client of a Cxmpute host: typed requests and answers, one
//! error enum, streams, and no hand-written JSON.
//!
//! - [`Client`]: one per host, built with [`Client::builder`]; cheap to clone.
//! - The calls, grouped by who makes them: [`Client::user`] (the
//!   OpenAI-compatible gateway and the services), [`Client::account`]
//!   (sign-in, sessions, own keys and usage), [`Client::provider`] (a
//!   provider's account and nodes), [`Client::admin`] (accounts, credits,
//!   suspensions, nodes, prices, notifications), [`Client::stats`] (usage
//!   analytics and metrics).
//! - [`Error`]: the HTTP status and the parsed OpenAI error body, or what
//!   went wrong on the way (connect, timeout, transport, decode).
//! - [`ChatStream`]: a streamed chat completion as a `futures::Stream` of
//!   typed chunks; [`ByteStream`]: streamed audio.
//!
//! The request and answer bodies are the API's types from `cxmpute-api`,
//! re-exported as [`wire`], [`types`] and [`analytics`]: the client and the
//! host share one definition, and the client builds none of the host.
//!
//! ```no_run
//! use cxmpute_client::Client;
//! use cxmpute_client::wire::{ChatCompletionRequest, ChatMessage};
//! use futures::StreamExt;
//!
//! # async fn run() -> Result<(), cxmpute_client::Error> {
//! let client = Client::new("http://127.0.0.1:8080", "cx-...")?;
//! let req = ChatCompletionRequest::new("llama3.2:3b", vec![ChatMessage::user("Hello!")]);
//!
//! let answer = client.user().chat(&req).await?;
//! println!("{}", answer.choices[0].message.text().unwrap_or_default());
//!
//! let mut stream = client.user().chat_stream(&req).await?;
//! while let Some(chunk) = stream.next().await {
//!     for choice in chunk?.choices {
//!         print!("{}", choice.delta.content.unwrap_or_default());
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Retries
//!
//! Idempotent calls (reads, `PUT`s, `DELETE`s, heartbeats) are retried with
//! exponential backoff when the host answers 429 or 503 (honouring
//! `Retry-After`) or cannot be reached; see [`RetryPolicy`]. Gateway calls are
//! never retried by the client, since a call that reached a node may have
//! been charged.
//!
//! ## Transport
//!
//! HTTP/1.1 over hyper, with a pool of kept-alive connections shared by a
//! client and its clones. `https://` hosts need the default feature
//! `rustls` (rustls with ring, Mozilla's root certificates); without it the
//! client speaks plain `http://` only, and an `https://` base URL is a
//! configuration error. Kept small on purpose, it does not read proxy
//! settings from the environment (`HTTP_PROXY`, `HTTPS_PROXY`), follow
//! redirects (a `3xx` is an error with its status) or decompress answers.

// Items are `pub` only where an embedder can reach them; the rest say `pub(crate)`.
#![warn(unreachable_pub)]

mod account;
mod admin;
mod client;
mod error;
mod provider;
mod session;
mod stats;
mod stream;
mod transport;
mod user;

pub use account::AccountApi;
pub use admin::AdminApi;
pub use client::{Client, ClientBuilder, RetryPolicy};
pub use error::{ApiError, Error, Result, TimeoutPhase};
pub use provider::ProviderApi;
pub use stats::StatsApi;
pub use stream::{ByteStream, ChatStream, SseStream};
pub use user::UserApi;

/// The request and answer bodies, shared with the host.
pub use cxmpute_api::wire;

/// The domain types used in the wire types (ids, [`Credits`](types::Credits), services...).
pub use cxmpute_api::types;

/// The host's analytics answers ([`StatsApi`]), shared with the host.
pub use cxmpute_api::analytics;

/// A secret (API key, token) whose `Debug` and `Display` are redacted, as the
/// wire types carry them.
pub use cxmpute_api::secret::Secret;

/// URLs, as [`Client::base_url`] returns them.
pub use http::Uri;
