#![doc = include_str!("../README.md")]
//!
//! ## Features
//!
//! This facade re-exports [`cxmpute_core`] as [`core`] and turns the backends
//! on by feature: `sqlite` (default) re-exports the SQLite store as `sqlite`,
//! `dynamo` the DynamoDB store as `dynamo`, `client` the typed client as
//! `client`.

pub use cxmpute_core as core;

#[cfg(feature = "sqlite")]
pub use cxmpute_store_sqlite as sqlite;

#[cfg(feature = "dynamo")]
pub use cxmpute_store_dynamo as dynamo;

#[cfg(feature = "client")]
pub use cxmpute_client as client;
