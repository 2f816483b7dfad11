//! Core's tests over real sockets, as one test binary: a host on loopback,
//! stand-in nodes, a real browser, SMTP and OpenAPI tools when the test
//! script provides them. Each module was once a binary of its own; one
//! binary links once instead of once per file.
//!
//! Tests that change process-wide state (environment variables, tracing's
//! callsite cache) are binaries of their own beside this one.

// Shared with the other test binaries of core, and the root's SQLite tests.
#[path = "../common/mod.rs"]
mod common;

mod account_budget;
mod accounts;
mod admission;
mod authz;
mod budget;
mod cache;
mod catalogue;
mod charged;
mod dashboard;
mod fallback;
mod gateway;
mod hostile;
mod keys;
mod metrics;
mod network;
mod openapi;
mod ratelimit;
mod serve;
mod stats;
mod store_calls;
mod verify;
