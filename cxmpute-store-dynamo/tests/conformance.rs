//! The store conformance suite against `DynamoStore`, each test on a fresh
//! table of its own (a random table prefix) on the server named by
//! `CXMPUTE_TEST_DYNAMO_ENDPOINT`.

mod common;

// The macro evaluates its argument inside each generated test's body, so
// the early `return` below ends that test (with the skip notice printed by
// `dynamo_endpoint`) before any store is asked for when no server is set.
cxmpute_core::store_conformance_tests!({
    if common::dynamo_endpoint().is_none() {
        return;
    }
    common::fresh_dyn_store
});
