//! What the DynamoDB tests share: where the server is, and fresh tables.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use cxmpute_core::secret::random_token;
use cxmpute_core::Store;
use cxmpute_store_dynamo::{DynamoConfig, DynamoStore, RequestGate, StaticCredentials};

/// The endpoint of the DynamoDB-compatible server to test against, from
/// `CXMPUTE_TEST_DYNAMO_ENDPOINT`. Without it a test prints a skip notice
/// and returns, unless `CXMPUTE_REQUIRE_SERVICES=1` says the server must be
/// there (the project's test script sets both), in which case it fails.
pub fn dynamo_endpoint() -> Option<String> {
    cxmpute_core::testkit::service_env("CXMPUTE_TEST_DYNAMO_ENDPOINT")
}

/// A configuration for `endpoint` with a table prefix no other test uses,
/// and credentials set here so the tests do not depend on the environment.
pub fn config(endpoint: &str) -> DynamoConfig {
    let mut cfg = DynamoConfig::new(format!("t{}_", random_token(12).to_lowercase()))
        .with_endpoint(endpoint)
        .with_region("us-east-1")
        .with_credentials(StaticCredentials::new("testing", "testing"));
    // The suite races 100-200 transactions on one account; give them room.
    cfg.conflict_retries = 40;
    // Late in a run the test server takes seconds per transaction (it
    // copies its tables for each): wait for it rather than time out, since
    // a request abandoned while the server still runs it would overlap the
    // next one (a settle retried after its first try committed).
    cfg.attempt_timeout = std::time::Duration::from_secs(60);
    cfg.operation_timeout = std::time::Duration::from_secs(120);
    // The test server does not isolate concurrent requests (see
    // `request_gate`): one request at a time from every store of this test
    // binary, so concurrency tests check the store, not the server.
    static GATE: OnceLock<RequestGate> = OnceLock::new();
    cfg.request_gate = Some(GATE.get_or_init(|| RequestGate::new(1)).clone());
    cfg
}

/// A store on a fresh, empty table of its own.
pub async fn fresh_store(endpoint: &str) -> DynamoStore {
    store_on(config(endpoint)).await
}

/// A store on the table `cfg` names, created if missing.
pub async fn store_on(cfg: DynamoConfig) -> DynamoStore {
    let store = DynamoStore::connect(cfg).await.expect("connect");
    store
        .create_tables_if_missing()
        .await
        .expect("create the table");
    store
}

/// [`fresh_store`] as the conformance suite wants it.
pub async fn fresh_dyn_store() -> Arc<dyn Store> {
    let endpoint = dynamo_endpoint().expect("checked before the store is asked for");
    Arc::new(fresh_store(&endpoint).await)
}
