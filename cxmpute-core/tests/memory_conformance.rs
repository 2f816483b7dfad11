//! The store conformance suite against the in-memory reference store.

use std::sync::Arc;

use cxmpute_core::{MemoryStore, Store};

async fn fresh_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

cxmpute_core::store_conformance_tests!(fresh_store);
