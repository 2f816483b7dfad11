//! The routing index on its own, for benchmarks of selection and index
//! updates. The broker's own index is not reachable from outside the crate
//! (only the broker changes it, after the store agreed); this is a separate
//! one, filled by the benchmark.

use std::sync::Arc;

use crate::pool::{PoolIndex, RoutePreferences};
use crate::select::{Node, ProvisionSelector};
use crate::types::{PoolEntry, ProvisionId, Service};

/// A routing index of its own, apart from any broker's. Each method is
/// the index's own operation, inlined, so a benchmark measures the index.
#[derive(Debug, Default)]
pub struct RoutingIndex(PoolIndex);

impl RoutingIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a node's entries: it joins exactly these pools (none: it leaves).
    #[inline]
    pub fn upsert(&self, id: &ProvisionId, entries: Vec<PoolEntry>) {
        self.0.upsert(id, entries);
    }

    /// Removes a node from every pool.
    #[inline]
    pub fn remove(&self, id: &ProvisionId) {
        self.0.remove(id);
    }

    /// Takes a node out of routing (`false`) or puts it back (`true`).
    #[inline]
    pub fn set_healthy(&self, id: &ProvisionId, healthy: bool) {
        self.0.set_healthy(id, healthy);
    }

    /// Records a finished request on a node's first entry, as the gateway
    /// does after an attempt: its latency (microseconds) and outcome.
    pub fn observe(&self, id: &ProvisionId, latency_us: u64, success: bool) {
        if let Some(n) = self.0.any_node(id) {
            n.observe(latency_us, success);
        }
    }

    /// Picks a routable node of (service, model) with `selector`, skipping `excluded`.
    #[inline]
    pub fn select(
        &self,
        service: Service,
        model: &str,
        selector: &dyn ProvisionSelector,
        excluded: &[ProvisionId],
    ) -> Option<Arc<Node>> {
        self.0.select(service, model, selector, excluded)
    }

    /// Like [`RoutingIndex::select`], preferring the region of `prefs`.
    #[inline]
    pub fn select_with(
        &self,
        service: Service,
        model: &str,
        selector: &dyn ProvisionSelector,
        excluded: &[ProvisionId],
        prefs: &RoutePreferences,
    ) -> Option<Arc<Node>> {
        self.0
            .select_with(service, model, selector, excluded, prefs)
    }
}
