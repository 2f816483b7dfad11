//! # Cxmpute
//!
//! An embeddable marketplace broker for AI compute: an OpenAI-compatible
//! gateway (chat, embeddings, speech, scraping, vision) in front of a network
//! of provider nodes, with API keys, prepaid credits, provider rewards and
//! usage records.
//!
//! This facade re-exports [`cxmpute_core`] as [`core`] and turns the backends
//! on by feature: `sqlite` (default) re-exports the SQLite store as
//! [`sqlite`], `dynamo` the DynamoDB store as `dynamo`, `client` the typed
//! client as `client`.
//!
//! ## Embedding the broker in an axum application
//!
//! ```no_run
//! use std::sync::Arc;
//! use cxmpute::core::{router, Broker, MemoryStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Broker::builder(Arc::new(MemoryStore::new())).build().await?;
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "my service" }))
//!     .merge(router(broker.clone()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! broker.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub use cxmpute_core as core;

#[cfg(feature = "sqlite")]
pub use cxmpute_store_sqlite as sqlite;

#[cfg(feature = "dynamo")]
pub use cxmpute_store_dynamo as dynamo;

#[cfg(feature = "client")]
pub use cxmpute_client as client;
