//! The in-memory routing index: for each (service, model), the nodes that
//! serve it, with live per-node statistics.
//!
//! Routing reads only this index (never the store). Joins, leaves and health
//! changes are O(1) per pool entry: each pool is a vector plus a position map,
//! and removal is a swap-remove. Each pool also keeps one sub-pool per region
//! (the node's country), so a request that prefers a region is served in O(1)
//! as well.
//!
//! Per-node statistics ([`NodeStats`]) are atomics shared by all of a node's
//! entries, so the request path records latency, load and outcomes without
//! taking any lock.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::RwLock;

use crate::health::NodeHealth;
use crate::select::{Candidates, ProvisionSelector};
use crate::types::{PoolEntry, ProvisionId, Service};

/// How fast a latency estimate forgets a slow sample when no new sample
/// arrives: after this long only 1/e of the excess is left. Long enough that
/// one slow answer keeps a node out of favour for a while, short enough that
/// a node that recovered is tried again within a minute.
pub const EWMA_DECAY_US: f64 = 10_000_000.0;

/// The load score of a node that has answered nothing yet while requests to
/// it are in flight (per request): so large that it is avoided until its
/// first answer. With nothing in flight its score is 0, so a new node is
/// tried at once, one request at a time, and then ranked by what it did.
pub const UNMEASURED_PENALTY_US: u64 = u64::MAX >> 16;

/// The least latency a failure counts as (1 s). A node failing fast (a
/// refused connection) must not look like the fastest node.
pub const FAILURE_PENALTY_US: u64 = 1_000_000;

/// Microseconds on a process-wide monotonic clock: the time base of
/// [`NodeStats::load_score_at`]. Latency estimates decay with real elapsed
/// time; they are heuristics for choosing a node and never decide money or
/// expiry, so they do not use the broker's [`Clock`](crate::Clock).
pub fn mono_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// See [`coarse_now_us`].
static COARSE_NOW_US: AtomicU64 = AtomicU64::new(0);

/// [`mono_us`] as of the latest answer any node gave (to within a
/// millisecond): what selectors use as "now". One relaxed load.
///
/// Reading the clock costs tens of nanoseconds on some virtual machines,
/// more than the rest of a selection; the latency decay it feeds works on a
/// scale of seconds, and while requests flow the answers keep this fresh.
pub fn coarse_now_us() -> u64 {
    COARSE_NOW_US.load(Ordering::Relaxed)
}

/// Advances the coarse time to `now`, writing the shared value only about
/// once a millisecond so concurrent answers do not contend on it.
fn advance_coarse(now: u64) {
    if now > COARSE_NOW_US.load(Ordering::Relaxed).saturating_add(1_000) {
        COARSE_NOW_US.fetch_max(now, Ordering::Relaxed);
    }
}

/// Live statistics of one node, shared by all its pool entries and updated
/// by the pipeline with atomics (no lock on the hot path).
///
/// Aligned to a cache line so two nodes' counters never share one (requests
/// on different nodes then do not slow each other down).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct NodeStats {
    in_flight: AtomicU32,
    /// Peak-EWMA of latency in microseconds (0 = no sample yet).
    ewma_us: AtomicU64,
    /// When `ewma_us` was last updated, on [`mono_us`].
    stamp_us: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    /// The node's circuit breaker and probe state.
    health: NodeHealth,
}

impl NodeStats {
    /// Requests being served by the node right now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate in microseconds as last recorded (0 before the
    /// first sample), without the decay since then.
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
    /// that turns slow is avoided immediately); a lower one pulls it down with
    /// a weight that grows with the time since the last sample (so a burst of
    /// fast answers does not hide a slow node, but a node that stays fast is
    /// believed within seconds). A failure counts as a sample of at least
    /// twice the current estimate and [`FAILURE_PENALTY_US`].
    pub fn observe(&self, latency_us: u64, success: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let now = mono_us();
        advance_coarse(now);
        let sample = if success {
            latency_us
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            latency_us
                .max(self.ewma_us().saturating_mul(2))
                .max(FAILURE_PENALTY_US)
        };
        let stamp = self.stamp_us.swap(now, Ordering::Relaxed);
        let w = decay_weight(now.saturating_sub(stamp));
        let _ = self
            .ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 || sample >= old {
                    sample
                } else {
                    // `old > sample` here, so the result stays in (sample, old].
                    let blended = sample as f64 + (old - sample) as f64 * w;
                    (blended as u64).max(1)
                })
            });
    }

    /// The latency estimate now: the recorded one decayed toward zero by the
    /// time since it was recorded (so an idle node is tried again); 0 before
    /// the first sample.
    pub fn latency_estimate_us(&self) -> u64 {
        self.latency_estimate_at(mono_us())
    }

    fn latency_estimate_at(&self, now_us: u64) -> u64 {
        let ewma = self.ewma_us();
        if ewma == 0 {
            return 0;
        }
        let idle = now_us.saturating_sub(self.stamp_us.load(Ordering::Relaxed));
        if idle == 0 {
            return ewma;
        }
        ((ewma as f64 * decay_weight(idle)) as u64).max(1)
    }

    /// The load score used by peak-EWMA selection: latency estimate ×
    /// (in-flight + 1); for a node not measured yet, 0 when idle and
    /// [`UNMEASURED_PENALTY_US`] per request in flight otherwise. Lower is better.
    pub fn load_score(&self) -> u64 {
        self.load_score_at(mono_us())
    }

    /// [`NodeStats::load_score`] at `now_us` on [`mono_us`]: a selector
    /// comparing several nodes reads the clock once.
    pub fn load_score_at(&self, now_us: u64) -> u64 {
        let in_flight = u64::from(self.in_flight());
        if self.ewma_us() == 0 {
            return UNMEASURED_PENALTY_US.saturating_mul(in_flight);
        }
        self.latency_estimate_at(now_us)
            .saturating_mul(in_flight + 1)
    }

    /// The node's circuit breaker (see [`crate::health`]).
    pub fn health(&self) -> &NodeHealth {
        &self.health
    }
}

/// `e^(-dt/τ)`: how much of an old estimate is kept after `dt_us`.
fn decay_weight(dt_us: u64) -> f64 {
    (-(dt_us as f64) / EWMA_DECAY_US).exp()
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
    /// The entry's region, normalised by [`normalize_region`] (empty: none).
    region: String,
}

impl Node {
    /// A node for `entry` with `stats` (for selectors' tests and benchmarks;
    /// the index builds its own).
    pub fn new(entry: PoolEntry, stats: Arc<NodeStats>) -> Self {
        let region = normalize_region(&entry.region);
        Node {
            entry,
            stats,
            region,
        }
    }
}

/// A region as the index keys it: trimmed and upper-cased (`de` and ` DE`
/// are the same region).
pub fn normalize_region(region: &str) -> String {
    region.trim().to_ascii_uppercase()
}

/// What a request asks of the node it is routed to, beyond its pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePreferences {
    region: Option<String>,
}

impl RoutePreferences {
    /// No preference: any node of the pool.
    pub fn none() -> Self {
        Self::default()
    }

    /// Prefer nodes in `region` (a node's location country, compared
    /// case-insensitively); other nodes serve when the region has none left.
    pub fn region(region: &str) -> Self {
        let r = normalize_region(region);
        RoutePreferences {
            region: (!r.is_empty()).then_some(r),
        }
    }

    /// The preferred region, normalised.
    pub fn preferred_region(&self) -> Option<&str> {
        self.region.as_deref()
    }
}

/// One routable node in a pool: the node and, beside it, its statistics, so
/// a selector comparing nodes reads their statistics without going through
/// the node (one memory access fewer per candidate in large pools).
#[derive(Debug, Clone)]
pub struct Slot {
    /// The node.
    pub node: Arc<Node>,
    /// Its statistics (the same as `node.stats`).
    pub stats: Arc<NodeStats>,
}

impl Slot {
    /// The slot of a node.
    pub fn new(node: Arc<Node>) -> Self {
        let stats = node.stats.clone();
        Slot { node, stats }
    }
}

/// One list of routable nodes with O(1) insert and remove.
#[derive(Debug, Default)]
struct Pool {
    nodes: Vec<Slot>,
    pos: HashMap<ProvisionId, usize>,
    /// Round-robin position: each pool has its own, so pools used in turn do
    /// not skew one another.
    cursor: AtomicUsize,
}

impl Pool {
    fn insert(&mut self, node: Arc<Node>) {
        match self.pos.get(&node.entry.provision_id) {
            Some(&i) => self.nodes[i] = Slot::new(node),
            None => {
                self.pos
                    .insert(node.entry.provision_id.clone(), self.nodes.len());
                self.nodes.push(Slot::new(node));
            }
        }
    }

    fn remove(&mut self, id: &ProvisionId) -> bool {
        let Some(i) = self.pos.remove(id) else {
            return false;
        };
        self.nodes.swap_remove(i);
        if let Some(moved) = self.nodes.get(i) {
            if let Some(p) = self.pos.get_mut(&moved.node.entry.provision_id) {
                *p = i;
            }
        }
        true
    }

    fn candidates(&self) -> Candidates<'_> {
        Candidates::new(&self.nodes, &self.cursor)
    }

    fn select(&self, selector: &dyn ProvisionSelector, excluded: &[ProvisionId]) -> Option<usize> {
        if self.nodes.is_empty() {
            return None;
        }
        selector.select(&self.candidates(), excluded)
    }
}

/// The routable nodes of one (service, model), whole and by region.
#[derive(Debug, Default)]
struct ModelPool {
    all: Pool,
    by_region: HashMap<String, Pool>,
}

impl ModelPool {
    fn insert(&mut self, node: &Arc<Node>) {
        self.all.insert(node.clone());
        if !node.region.is_empty() {
            self.by_region
                .entry(node.region.clone())
                .or_default()
                .insert(node.clone());
        }
    }

    fn remove(&mut self, node: &Node) {
        self.all.remove(&node.entry.provision_id);
        if let Some(p) = self.by_region.get_mut(&node.region) {
            p.remove(&node.entry.provision_id);
            if p.nodes.is_empty() {
                self.by_region.remove(&node.region);
            }
        }
    }
}

/// Everything the index knows about one node.
#[derive(Debug)]
struct NodeRecord {
    /// One routable node per pool entry, built once and reused across health changes.
    nodes: Vec<Arc<Node>>,
    stats: Arc<NodeStats>,
    healthy: bool,
}

/// A fast hash for model names (FxHash's multiply-rotate). The request path
/// looks a model up on every call; SipHash's resistance to crafted keys is
/// not needed here because only nodes add models, and only models of the
/// catalogue, so no caller can fill the map with colliding names.
#[derive(Default)]
struct ModelHasher(u64);

impl Hasher for ModelHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Models of one service, by name.
type ByModel<V> = HashMap<String, V, BuildHasherDefault<ModelHasher>>;

/// Per service, by [`service_slot`]: a plain array instead of a hash lookup.
type PerService<V> = [ByModel<V>; Service::ALL.len()];

/// The position of a service in a [`PerService`] array.
fn service_slot(s: Service) -> usize {
    match s {
        Service::Chat => 0,
        Service::Embeddings => 1,
        Service::Tts => 2,
        Service::Scrape => 3,
        Service::Vision => 4,
    }
}

#[derive(Debug, Default)]
struct Index {
    /// Routable (healthy) nodes per pool: service, then model (looked up by `&str`).
    pools: PerService<ModelPool>,
    /// Every node, routable or not, so it can return after a health change.
    nodes: HashMap<ProvisionId, NodeRecord>,
    /// Nodes offering each (service, model), healthy or not.
    offered: PerService<usize>,
}

impl Index {
    fn route(&mut self, node: &Arc<Node>) {
        self.pools[service_slot(node.entry.service)]
            .entry(node.entry.model.clone())
            .or_default()
            .insert(node);
    }

    fn unroute(&mut self, node: &Node) {
        let by_model = &mut self.pools[service_slot(node.entry.service)];
        if let Some(p) = by_model.get_mut(node.entry.model.as_str()) {
            p.remove(node);
            if p.all.nodes.is_empty() {
                by_model.remove(node.entry.model.as_str());
            }
        }
    }

    fn count_offer(&mut self, node: &Node, up: bool) {
        let by_model = &mut self.offered[service_slot(node.entry.service)];
        if up {
            *by_model.entry(node.entry.model.clone()).or_default() += 1;
        } else if let Some(n) = by_model.get_mut(node.entry.model.as_str()) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_model.remove(node.entry.model.as_str());
            }
        }
    }

    /// Takes a node out of every pool and the offer counts; returns its record.
    fn detach(&mut self, id: &ProvisionId) -> Option<NodeRecord> {
        let rec = self.nodes.remove(id)?;
        for n in &rec.nodes {
            if rec.healthy {
                self.unroute(n);
            }
            self.count_offer(n, false);
        }
        Some(rec)
    }
}

/// The routing index. Cheap reads under a read lock; O(1) updates.
#[derive(Debug, Default)]
pub struct PoolIndex {
    index: RwLock<Index>,
}

impl PoolIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The live statistics of a node in the index.
    pub fn stats(&self, id: &ProvisionId) -> Option<Arc<NodeStats>> {
        self.index.read().nodes.get(id).map(|r| r.stats.clone())
    }

    /// Sets a node's entries (replacing any it had): it joins exactly these
    /// pools. Its statistics and health mark are kept. No entries: the node
    /// leaves the index.
    pub fn upsert(&self, id: &ProvisionId, entries: Vec<PoolEntry>) {
        let mut ix = self.index.write();
        let old = ix.detach(id);
        if entries.is_empty() {
            return;
        }
        let (stats, healthy) = old.map_or_else(|| (Arc::default(), true), |r| (r.stats, r.healthy));
        let mut nodes: Vec<Arc<Node>> = Vec::with_capacity(entries.len());
        for e in entries {
            // One entry per (service, model): a duplicate would count twice.
            let dup = nodes
                .iter()
                .any(|n| n.entry.service == e.service && n.entry.model == e.model);
            if !dup {
                nodes.push(Arc::new(Node::new(e, stats.clone())));
            }
        }
        for n in &nodes {
            ix.count_offer(n, true);
            if healthy {
                ix.route(n);
            }
        }
        ix.nodes.insert(
            id.clone(),
            NodeRecord {
                nodes,
                stats,
                healthy,
            },
        );
    }

    /// Removes a node from every pool, with its statistics and health mark.
    pub fn remove(&self, id: &ProvisionId) {
        self.index.write().detach(id);
    }

    /// Takes a node out of routing (`false`) or puts it back (`true`), keeping
    /// its entries. Unknown nodes are ignored: a health verdict about a node
    /// that has left must not stick to it if it joins again.
    pub fn set_healthy(&self, id: &ProvisionId, healthy: bool) {
        let mut ix = self.index.write();
        let Some(rec) = ix.nodes.get_mut(id) else {
            return;
        };
        if rec.healthy == healthy {
            return;
        }
        rec.healthy = healthy;
        let nodes = rec.nodes.clone();
        for n in &nodes {
            if healthy {
                ix.route(n);
            } else {
                ix.unroute(n);
            }
        }
    }

    /// Whether a node is currently routable.
    pub fn is_healthy(&self, id: &ProvisionId) -> bool {
        self.index.read().nodes.get(id).is_some_and(|r| r.healthy)
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
            ix.nodes
                .keys()
                .filter(|id| !by_node.contains_key(*id))
                .cloned()
                .collect()
        };
        for id in gone {
            self.remove(&id);
        }
        for (id, es) in by_node {
            if self.entries_of(&id) != es {
                self.upsert(&id, es);
            }
        }
    }

    /// Whether any node (healthy or not) offers this (service, model).
    pub fn is_offered(&self, service: Service, model: &str) -> bool {
        self.index.read().offered[service_slot(service)].contains_key(model)
    }

    /// Picks a routable node for (service, model) with `selector`, skipping `excluded`.
    pub fn select(
        &self,
        service: Service,
        model: &str,
        selector: &dyn ProvisionSelector,
        excluded: &[ProvisionId],
    ) -> Option<Arc<Node>> {
        self.select_with(
            service,
            model,
            selector,
            excluded,
            &RoutePreferences::none(),
        )
    }

    /// Like [`PoolIndex::select`], honouring the request's preferences: nodes
    /// of the preferred region first, any node when the region has none left.
    pub fn select_with(
        &self,
        service: Service,
        model: &str,
        selector: &dyn ProvisionSelector,
        excluded: &[ProvisionId],
        prefs: &RoutePreferences,
    ) -> Option<Arc<Node>> {
        let ix = self.index.read();
        let mp = ix.pools[service_slot(service)].get(model)?;
        if let Some(p) = prefs.region.as_deref().and_then(|r| mp.by_region.get(r)) {
            if let Some(i) = p.select(selector, excluded) {
                return Some(p.nodes[i].node.clone());
            }
        }
        mp.all
            .select(selector, excluded)
            .map(|i| mp.all.nodes[i].node.clone())
    }

    /// Every pool with its routable node count, sorted.
    pub fn summary(&self) -> Vec<(Service, String, usize)> {
        let ix = self.index.read();
        let mut v: Vec<_> = Service::ALL
            .iter()
            .flat_map(|s| {
                ix.pools[service_slot(*s)]
                    .iter()
                    .map(|(m, p)| (*s, m.clone(), p.all.nodes.len()))
            })
            .collect();
        v.sort();
        v
    }

    /// How many nodes (healthy or not) offer each (service, model): what the
    /// network has, for assigning services to new nodes.
    pub fn coverage(&self) -> HashMap<(Service, String), usize> {
        let ix = self.index.read();
        Service::ALL
            .iter()
            .flat_map(|s| {
                ix.offered[service_slot(*s)]
                    .iter()
                    .map(|(m, n)| ((*s, m.clone()), *n))
            })
            .collect()
    }

    /// The ids of every node in the index.
    pub fn node_ids(&self) -> Vec<ProvisionId> {
        self.index.read().nodes.keys().cloned().collect()
    }

    /// How many nodes the index holds, routable or not.
    pub fn node_count(&self) -> usize {
        self.index.read().nodes.len()
    }

    /// A node's entries, routable or not.
    pub fn entries_of(&self, id: &ProvisionId) -> Vec<PoolEntry> {
        self.index
            .read()
            .nodes
            .get(id)
            .map(|r| r.nodes.iter().map(|n| n.entry.clone()).collect())
            .unwrap_or_default()
    }

    /// One routable-or-not node of a provision (its first entry), with its stats:
    /// what a health probe needs (endpoint, secret).
    pub fn any_node(&self, id: &ProvisionId) -> Option<Arc<Node>> {
        self.index
            .read()
            .nodes
            .get(id)
            .and_then(|r| r.nodes.first().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::RoundRobinSelector;
    use crate::types::ProviderId;

    fn entry(id: &str, service: Service, model: &str, region: &str) -> PoolEntry {
        PoolEntry {
            provision_id: ProvisionId::new(id),
            provider_id: ProviderId::new("prv_1"),
            service,
            model: model.into(),
            endpoint: format!("http://{id}.example"),
            node_secret: "s".into(),
            tier: 2,
            region: region.into(),
        }
    }

    #[test]
    fn joins_leaves_and_health_changes_keep_pools_and_counts_true() {
        let ix = PoolIndex::new();
        let a = ProvisionId::new("a");
        let b = ProvisionId::new("b");
        ix.upsert(
            &a,
            vec![
                entry("a", Service::Chat, "llama3.2:3b", "DE"),
                entry("a", Service::Embeddings, "all-minilm", "DE"),
                entry("a", Service::Chat, "llama3.2:3b", "DE"),
            ],
        );
        ix.upsert(&b, vec![entry("b", Service::Chat, "llama3.2:3b", "us")]);
        assert_eq!(
            ix.summary(),
            vec![
                (Service::Chat, "llama3.2:3b".into(), 2),
                (Service::Embeddings, "all-minilm".into(), 1)
            ]
        );
        assert_eq!(ix.entries_of(&a).len(), 2, "duplicates are dropped");
        ix.set_healthy(&a, false);
        assert!(ix.is_offered(Service::Embeddings, "all-minilm"));
        assert_eq!(ix.summary(), vec![(Service::Chat, "llama3.2:3b".into(), 1)]);
        let rr = RoundRobinSelector;
        let de = RoutePreferences::region("de");
        let n = ix
            .select_with(Service::Chat, "llama3.2:3b", &rr, &[], &de)
            .unwrap();
        assert_eq!(
            n.entry.provision_id, b,
            "falls back when the region has none"
        );
        ix.set_healthy(&a, true);
        for _ in 0..4 {
            let n = ix
                .select_with(Service::Chat, "llama3.2:3b", &rr, &[], &de)
                .unwrap();
            assert_eq!(n.entry.provision_id, a, "the preferred region first");
        }
        let n = ix
            .select_with(
                Service::Chat,
                "llama3.2:3b",
                &rr,
                std::slice::from_ref(&a),
                &de,
            )
            .unwrap();
        assert_eq!(n.entry.provision_id, b);
        ix.remove(&a);
        assert!(!ix.is_offered(Service::Embeddings, "all-minilm"));
        ix.set_healthy(&a, false);
        ix.upsert(&a, vec![entry("a", Service::Chat, "llama3.2:3b", "DE")]);
        assert!(
            ix.is_healthy(&a),
            "a verdict on a departed node does not stick"
        );
        assert_eq!(ix.coverage()[&(Service::Chat, "llama3.2:3b".into())], 2);
        ix.upsert(&a, Vec::new());
        assert_eq!(ix.node_count(), 1);
    }

    #[test]
    fn rebuild_keeps_stats_and_health_of_nodes_that_stay() {
        let ix = PoolIndex::new();
        let a = ProvisionId::new("a");
        ix.upsert(&a, vec![entry("a", Service::Chat, "m", "")]);
        ix.upsert(
            &ProvisionId::new("b"),
            vec![entry("b", Service::Chat, "m", "")],
        );
        ix.stats(&a).unwrap().observe(5_000, true);
        ix.set_healthy(&a, false);
        ix.rebuild(vec![entry("a", Service::Chat, "m", "")]);
        assert_eq!(ix.node_ids(), vec![a.clone()]);
        assert!(!ix.is_healthy(&a));
        assert_eq!(ix.stats(&a).unwrap().requests(), 1);
    }

    #[test]
    fn peak_ewma_jumps_up_at_once_and_failures_look_slow() {
        let s = NodeStats::default();
        assert_eq!(s.load_score(), 0, "a new idle node is tried first");
        let s = Arc::new(s);
        let g = s.start();
        assert_eq!(
            s.load_score(),
            UNMEASURED_PENALTY_US,
            "but one request at a time"
        );
        drop(g);
        s.observe(100, true);
        assert_eq!(s.ewma_us(), 100);
        s.observe(5_000, true);
        assert_eq!(s.ewma_us(), 5_000, "a slower sample replaces the estimate");
        s.observe(100, true);
        assert!(
            s.ewma_us() > 4_000,
            "one fast answer does not hide a slow node"
        );
        s.observe(10, false);
        assert!(s.ewma_us() >= FAILURE_PENALTY_US);
        assert_eq!((s.requests(), s.failures()), (4, 1));
    }
}
