//! The store conformance suite against `SqliteStore`, each test on a fresh
//! database file in its own temporary directory.

use std::sync::Arc;

use cxmpute_core::Store;
use cxmpute_store_sqlite::SqliteStore;

/// A fresh file database; the directory goes when the test ends.
async fn fresh_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(dir.path().join("cxmpute.db"))
        .await
        .expect("open a fresh database");
    (Arc::new(store), dir)
}

cxmpute_core::store_conformance_tests!(fresh_store);

/// The same suite in memory: `in_memory` routes reads through the writer,
/// a different path through the store worth holding to the same rules.
mod in_memory {
    use super::*;

    async fn fresh_store() -> Arc<dyn Store> {
        Arc::new(SqliteStore::in_memory().await.expect("in-memory database"))
    }

    cxmpute_core::store_conformance_tests!(fresh_store);
}
