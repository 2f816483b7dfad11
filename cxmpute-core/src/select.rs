//! Choosing a node from a pool: the [`ProvisionSelector`] trait and its
//! implementations.
//!
//! | selector | picks | cost per pick |
//! |---|---|---|
//! | [`PeakEwmaSelector`] (the default) | the lower load score (latency estimate × (in flight + 1)) of two random nodes | O(1) |
//! | [`LeastInFlightSelector`] | the node with the fewest requests in flight: exact in pools of up to [`LeastInFlightSelector::EXACT_UP_TO`] nodes, the lesser of two random nodes above | O(1) |
//! | [`RoundRobinSelector`] | each node in turn (per pool) | O(1) |
//! | [`RandomSelector`] | a uniformly random node (the original platform's behaviour) | O(1) |
//!
//! Every selector skips the nodes already tried for the request (`excluded`,
//! a handful at most); when nearly every node of a small pool is excluded it
//! falls back to a scan, which is bounded by the attempts per request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::pool::{coarse_now_us, Node, NodeStats, Slot};
use crate::types::ProvisionId;

/// The routable nodes of one pool, as a selector sees them.
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    nodes: &'a [Slot],
    cursor: &'a AtomicUsize,
}

impl<'a> Candidates<'a> {
    /// The nodes of a pool and the pool's own round-robin cursor.
    pub fn new(nodes: &'a [Slot], cursor: &'a AtomicUsize) -> Self {
        Candidates { nodes, cursor }
    }

    /// The nodes.
    pub fn nodes(&self) -> &'a [Slot] {
        self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &'a Arc<Node> {
        &self.nodes[i].node
    }

    /// The statistics of node `i`.
    pub fn stats(&self, i: usize) -> &'a NodeStats {
        &self.nodes[i].stats
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Takes the next position of the pool's cursor (wrapping), for selectors
    /// that go round.
    pub fn next_turn(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether node `i` may be chosen for a request that already tried `excluded`.
    pub fn allowed(&self, i: usize, excluded: &[ProvisionId]) -> bool {
        // Only looks into the node when something is excluded: on a first
        // attempt a selector touches nothing but the statistics it compares.
        excluded.is_empty() || !excluded.contains(&self.nodes[i].node.entry.provision_id)
    }
}

/// Picks one node of a pool for a request.
///
/// `candidates` are the pool's routable nodes (never empty when called
/// through the index); `excluded` are nodes already tried for this request.
/// Implementations must run in O(1) or O(log n) of the pool size and must
/// not block: they run on every request.
pub trait ProvisionSelector: Send + Sync + 'static {
    /// The index in `candidates` of the chosen node, or `None` when every
    /// node is excluded.
    fn select(&self, candidates: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize>;

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}

/// A uniformly random allowed index: a few random draws, then (only when
/// nearly everything is excluded) a scan from a random start.
fn random_allowed(
    rng: &mut impl Rng,
    c: &Candidates<'_>,
    excluded: &[ProvisionId],
) -> Option<usize> {
    let n = c.len();
    if n == 0 {
        return None;
    }
    for _ in 0..8 {
        let i = rng.random_range(0..n);
        if c.allowed(i, excluded) {
            return Some(i);
        }
    }
    // Only reached when most of a (then tiny) pool is excluded: bounded by
    // the number of attempts per request, not by the pool size in practice.
    let start = rng.random_range(0..n);
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| c.allowed(i, excluded))
}

/// Two different allowed indices drawn at random (or one, when only one is
/// allowed): the candidates of a power-of-two-choices pick.
fn two_allowed(
    rng: &mut impl Rng,
    c: &Candidates<'_>,
    excluded: &[ProvisionId],
) -> Option<(usize, Option<usize>)> {
    let n = c.len();
    let a = random_allowed(rng, c, excluded)?;
    if n == 1 {
        return Some((a, None));
    }
    for _ in 0..8 {
        // A draw from the other n-1 indices: never `a` itself.
        let r = rng.random_range(0..n - 1);
        let b = if r >= a { r + 1 } else { r };
        if c.allowed(b, excluded) {
            return Some((a, Some(b)));
        }
    }
    let b = (1..n)
        .map(|k| (a + k) % n)
        .find(|&i| c.allowed(i, excluded));
    Some((a, b))
}

/// The better of two candidates by `score` (lower wins); ties go either way
/// at random so equal nodes share the load.
fn better_of(
    rng: &mut impl Rng,
    pair: (usize, Option<usize>),
    score: impl Fn(usize) -> u64,
) -> usize {
    let (a, Some(b)) = pair else {
        return pair.0;
    };
    let (sa, sb) = (score(a), score(b));
    match sa.cmp(&sb) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal => {
            if rng.random::<bool>() {
                a
            } else {
                b
            }
        }
    }
}

/// Uniformly random choice: the original platform's behaviour.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomSelector;

impl ProvisionSelector for RandomSelector {
    fn select(&self, c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
        random_allowed(&mut rand::rng(), c, excluded)
    }

    fn name(&self) -> &'static str {
        "random"
    }
}

/// Each node in turn. The turn is kept per pool, so calls for other models
/// do not skew a pool's rotation. Nodes joining or leaving reorder the pool;
/// the rotation stays even over the nodes present.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobinSelector;

impl ProvisionSelector for RoundRobinSelector {
    fn select(&self, c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
        let n = c.len();
        if n == 0 {
            return None;
        }
        let start = c.next_turn() % n;
        // Excluded nodes are few (the attempts of one request), so this walks
        // a handful of steps at most, unless the pool is that small.
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| c.allowed(i, excluded))
    }

    fn name(&self) -> &'static str {
        "round_robin"
    }
}

/// The node with the fewest requests in flight.
///
/// Up to [`Self::EXACT_UP_TO`] nodes the whole pool is compared (from a
/// random start, so ties are spread); above that, the lesser of two random
/// nodes, which keeps the pick O(1) and, by the power of two choices, keeps
/// the busiest node within a small factor of the average.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastInFlightSelector;

impl LeastInFlightSelector {
    /// Pools up to this size are scanned whole.
    pub const EXACT_UP_TO: usize = 16;
}

impl ProvisionSelector for LeastInFlightSelector {
    fn select(&self, c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
        let n = c.len();
        let mut rng = rand::rng();
        let load = |i: usize| u64::from(c.stats(i).in_flight());
        if n <= Self::EXACT_UP_TO {
            if n == 0 {
                return None;
            }
            let start = rng.random_range(0..n);
            return (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| c.allowed(i, excluded))
                .min_by_key(|&i| load(i));
        }
        let pair = two_allowed(&mut rng, c, excluded)?;
        Some(better_of(&mut rng, pair, load))
    }

    fn name(&self) -> &'static str {
        "least_in_flight"
    }
}

/// Power of two choices over peak-EWMA load: of two random nodes, the one
/// with the lower latency estimate × (in flight + 1). The default selector.
///
/// Slow nodes lose nearly every comparison and so get a small share; a node
/// that has been idle has its estimate decay (see
/// [`NodeStats::latency_estimate_us`](crate::pool::NodeStats::latency_estimate_us))
/// and is tried again, so a node that recovered wins its share back.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeakEwmaSelector;

impl ProvisionSelector for PeakEwmaSelector {
    fn select(&self, c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
        let mut rng = rand::rng();
        let pair = two_allowed(&mut rng, c, excluded)?;
        let now = coarse_now_us();
        Some(better_of(&mut rng, pair, |i| c.stats(i).load_score_at(now)))
    }

    fn name(&self) -> &'static str {
        "peak_ewma"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PoolEntry, ProviderId, Service};

    fn nodes(n: usize) -> Vec<Slot> {
        (0..n)
            .map(|i| {
                Slot::new(Arc::new(Node::new(
                    PoolEntry {
                        provision_id: ProvisionId::new(format!("n{i}")),
                        provider_id: ProviderId::new("p"),
                        service: Service::Chat,
                        model: "m".into(),
                        endpoint: "http://x".into(),
                        node_secret: "s".into(),
                        tier: 1,
                        region: String::new(),
                    },
                    Arc::new(NodeStats::default()),
                )))
            })
            .collect()
    }

    fn all() -> Vec<Box<dyn ProvisionSelector>> {
        vec![
            Box::new(RandomSelector),
            Box::new(RoundRobinSelector),
            Box::new(LeastInFlightSelector),
            Box::new(PeakEwmaSelector),
        ]
    }

    #[test]
    fn every_selector_skips_excluded_nodes_and_gives_up_when_all_are() {
        for size in [1, 2, 3, 40] {
            let ns = nodes(size);
            let cursor = AtomicUsize::new(0);
            let c = Candidates::new(&ns, &cursor);
            let ids: Vec<ProvisionId> = ns
                .iter()
                .map(|n| n.node.entry.provision_id.clone())
                .collect();
            for s in all() {
                for _ in 0..50 {
                    let i = s.select(&c, &ids[1..]).unwrap();
                    assert_eq!(i, 0, "{} at {size}", s.name());
                }
                assert_eq!(s.select(&c, &ids), None, "{}", s.name());
            }
        }
        let empty: Vec<Slot> = Vec::new();
        let cursor = AtomicUsize::new(0);
        for s in all() {
            assert_eq!(s.select(&Candidates::new(&empty, &cursor), &[]), None);
        }
    }

    #[test]
    fn two_choices_are_distinct() {
        let ns = nodes(2);
        let cursor = AtomicUsize::new(0);
        let c = Candidates::new(&ns, &cursor);
        let mut rng = rand::rng();
        for _ in 0..100 {
            let (a, b) = two_allowed(&mut rng, &c, &[]).unwrap();
            assert_ne!(Some(a), b);
        }
    }
}
