//! The in-memory routing index: for each (service, model), the nodes that
//! serve it, with live per-node statistics.
//!
//! Routing reads only this index (never the store). Joins, leaves and health
//! changes are O(1): each pool is a vector plus a position map, and removal is
//! a swap-remove.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::select::ProvisionSelector;
use crate::types::{PoolEntry, ProvisionId, Service};

/// Live statistics of one node, shared by all its pool entries and updated
/// by the pipeline with atomics (no lock on the hot path).
#[derive(Debug, Default)]
pub struct NodeStats {
    in_flight: AtomicU32,
    /// Peak-EWMA of latency in microseconds (0 = no sample yet).
    ewma_us: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl NodeStats {
    /// Requests being served by the node right now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate in microseconds (0 before the first sample).
    pub fn ewma_us(&self) -> u64 {
        self.ewma_us.load(Ordering::Relaxed)
    }

    /// Requests completed (successes and failures).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Failed requests.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Marks a request started; the guard marks it finished when dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a finished request's latency and outcome.
    ///
    /// Peak-EWMA: a sample above the estimate replaces it at once (so a node
    /// that turns slow is avoided immediately); a lower one decays it with
    /// weight 1/8 (so one fast answer does not hide a slow node).
    pub fn observe(&self, latency_us: u64, success: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !success {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 || latency_us >= old {
                    latency_us
                } else {
                    old - (old - latency_us) / 8
                })
            });
    }

    /// The load score used by peak-EWMA selection: latency × (in-flight + 1).
    pub fn load_score(&self) -> u64 {
        let ewma = self.ewma_us().max(1);
        ewma.saturating_mul(u64::from(self.in_flight()) + 1)
    }
}

/// A started request on a node; finishing (drop) decrements the in-flight count.
#[derive(Debug)]
pub struct InFlight(Arc<NodeStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One routable node of a pool.
#[derive(Debug)]
pub struct Node {
    /// What the store says about the entry.
    pub entry: PoolEntry,
    /// The node's live statistics.
    pub stats: Arc<NodeStats>,
}

#[derive(Debug, Default)]
struct Pool {
    nodes: Vec<Arc<Node>>,
    pos: HashMap<ProvisionId, usize>,
}

impl Pool {
    fn insert(&mut self, node: Arc<Node>) {
        let id = node.entry.provision_id.clone();
        match self.pos.get(&id) {
            Some(&i) => self.nodes[i] = node,
            None => {
                self.pos.insert(id, self.nodes.len());
                self.nodes.push(node);
            }
        }
    }

    fn remove(&mut self, id: &ProvisionId) -> bool {
        let Some(i) = self.pos.remove(id) else {
            return false;
        };
        self.nodes.swap_remove(i);
        if let Some(moved) = self.nodes.get(i) {
            self.pos.insert(moved.entry.provision_id.clone(), i);
        }
        true
    }
}

#[derive(Debug, Default)]
struct Index {
    /// Routable (healthy) nodes per pool: service, then model (looked up by `&str`).
    pools: HashMap<Service, HashMap<String, Pool>>,
    /// Every entry a node has, routable or not, so it can return after a health change.
    entries: HashMap<ProvisionId, Vec<PoolEntry>>,
    /// Nodes taken out of routing by health checks.
    unhealthy: std::collections::HashSet<ProvisionId>,
}

/// The routing index. Cheap reads under a read lock; O(1) updates.
#[derive(Debug, Default)]
pub struct PoolIndex {
    index: RwLock<Index>,
    stats: RwLock<HashMap<ProvisionId, Arc<NodeStats>>>,
}

impl PoolIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The live statistics of a node (created on first use).
    pub fn stats(&self, id: &ProvisionId) -> Arc<NodeStats> {
        if let Some(s) = self.stats.read().get(id) {
            return s.clone();
        }
        self.stats.write().entry(id.clone()).or_default().clone()
    }

    /// Sets a node's entries (replacing any it had): it joins exactly these pools.
    pub fn upsert(&self, id: &ProvisionId, entries: Vec<PoolEntry>) {
        let stats = self.stats(id);
        let mut ix = self.index.write();
        Self::remove_locked(&mut ix, id);
        if !ix.unhealthy.contains(id) {
            for e in &entries {
                let node = Arc::new(Node {
                    entry: e.clone(),
                    stats: stats.clone(),
                });
                let by_model = ix.pools.entry(e.service).or_default();
                by_model.entry(e.model.clone()).or_default().insert(node);
            }
        }
        if entries.is_empty() {
            ix.entries.remove(id);
        } else {
            ix.entries.insert(id.clone(), entries);
        }
    }

    /// Removes a node from every pool.
    pub fn remove(&self, id: &ProvisionId) {
        let mut ix = self.index.write();
        Self::remove_locked(&mut ix, id);
        ix.entries.remove(id);
        ix.unhealthy.remove(id);
        drop(ix);
        self.stats.write().remove(id);
    }

    fn remove_locked(ix: &mut Index, id: &ProvisionId) {
        if let Some(old) = ix.entries.get(id).cloned() {
            for e in old {
                if let Some(by_model) = ix.pools.get_mut(&e.service) {
                    if let Some(p) = by_model.get_mut(&e.model) {
                        p.remove(id);
                        if p.nodes.is_empty() {
                            by_model.remove(&e.model);
                        }
                    }
                }
            }
        }
    }

    /// Takes a node out of routing (`false`) or puts it back (`true`), keeping its entries.
    pub fn set_healthy(&self, id: &ProvisionId, healthy: bool) {
        let mut ix = self.index.write();
        let was_healthy = !ix.unhealthy.contains(id);
        if healthy == was_healthy {
            return;
        }
        if healthy {
            ix.unhealthy.remove(id);
            let entries = ix.entries.get(id).cloned().unwrap_or_default();
            drop(ix);
            self.upsert(id, entries);
        } else {
            Self::remove_locked(&mut ix, id);
            ix.unhealthy.insert(id.clone());
        }
    }

    /// Whether a node is currently routable.
    pub fn is_healthy(&self, id: &ProvisionId) -> bool {
        let ix = self.index.read();
        ix.entries.contains_key(id) && !ix.unhealthy.contains(id)
    }

    /// Replaces the whole index with `entries` (grouped by node), keeping
    /// health marks and live stats of nodes that stay.
    pub fn rebuild(&self, entries: Vec<PoolEntry>) {
        let mut by_node: HashMap<ProvisionId, Vec<PoolEntry>> = HashMap::new();
        for e in entries {
            by_node.entry(e.provision_id.clone()).or_default().push(e);
        }
        let gone: Vec<ProvisionId> = {
            let ix = self.index.read();
            ix.entries
                .keys()
                .filter(|id| !by_node.contains_key(*id))
                .cloned()
                .collect()
        };
        for id in gone {
            self.remove(&id);
        }
        for (id, es) in by_node {
            let same = self.index.read().entries.get(&id) == Some(&es);
            if !same {
                self.upsert(&id, es);
            }
        }
    }

    /// Whether any node (healthy or not) offers this (service, model).
    pub fn is_offered(&self, service: Service, model: &str) -> bool {
        let ix = self.index.read();
        ix.pools
            .get(&service)
            .is_some_and(|m| m.contains_key(model))
            || ix
                .entries
                .values()
                .flatten()
                .any(|e| e.service == service && e.model == model)
    }

    /// Picks a routable node for (service, model) with `selector`, skipping `excluded`.
    pub fn select(
        &self,
        service: Service,
        model: &str,
        selector: &dyn ProvisionSelector,
        excluded: &[ProvisionId],
    ) -> Option<Arc<Node>> {
        let ix = self.index.read();
        let pool = ix.pools.get(&service)?.get(model)?;
        selector
            .select(&pool.nodes, excluded)
            .map(|i| pool.nodes[i].clone())
    }

    /// Every pool with its routable node count, sorted.
    pub fn summary(&self) -> Vec<(Service, String, usize)> {
        let ix = self.index.read();
        let mut v: Vec<_> = ix
            .pools
            .iter()
            .flat_map(|(s, by_model)| by_model.iter().map(|(m, p)| (*s, m.clone(), p.nodes.len())))
            .collect();
        v.sort();
        v
    }

    /// The ids of every node in the index.
    pub fn node_ids(&self) -> Vec<ProvisionId> {
        self.index.read().entries.keys().cloned().collect()
    }

    /// A node's entries, routable or not.
    pub fn entries_of(&self, id: &ProvisionId) -> Vec<PoolEntry> {
        self.index
            .read()
            .entries
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}
