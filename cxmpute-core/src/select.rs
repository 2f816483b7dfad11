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
//!
//! Selectors draw their candidates one pick ahead: each pick uses the
//! random pair ([`Candidates::random_pair`]) or the turn drawn by the
//! previous pick of the pool, and asks the CPU to prefetch the next one's
//! loads. In a pool larger than the caches the candidates are then on their
//! way before they are needed instead of costing a memory round trip inside
//! the pick (at 100,000 nodes this halves a peak-EWMA selection; see
//! `benches/routing.rs`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

pub use crate::pool::{LoadSnapshot, Node, NodeLoad};
use crate::types::ProvisionId;

/// The routable nodes of one pool, as a selector sees them.
///
/// A node's [`load`](Candidates::load) shares a cache line with the node's
/// reference count; its entry (strings) does not, so selectors compare loads
/// and read entries only when they must.
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    nodes: &'a [Arc<Node>],
    turns: &'a Turns,
}

/// A pool's round-robin cursor and random generator state, on a cache line
/// of their own: every selection writes one of them, and sharing a line with
/// the pool's node list would make every other core's next read of that list
/// a miss.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Turns {
    cursor: AtomicUsize,
    seed: AtomicU64,
    /// The next two-choice pair, drawn (and prefetched) by the previous
    /// pick: two indices packed high and low, or [`NO_PAIR`].
    ahead: AtomicU64,
}

/// No pair drawn ahead (a new pool, or one too large to pack indices in 32 bits).
const NO_PAIR: u64 = u64::MAX;

impl Default for Turns {
    fn default() -> Self {
        Turns {
            cursor: AtomicUsize::new(0),
            seed: AtomicU64::new(rand::random()),
            ahead: AtomicU64::new(NO_PAIR),
        }
    }
}

impl<'a> Candidates<'a> {
    /// The nodes of a pool and the pool's own cursor and generator.
    pub(crate) fn new(nodes: &'a [Arc<Node>], turns: &'a Turns) -> Self {
        Candidates { nodes, turns }
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &'a Arc<Node> {
        &self.nodes[i]
    }

    /// The live load of node `i`.
    pub fn load(&self, i: usize) -> &'a NodeLoad {
        self.nodes[i].load()
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
        self.turns.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// A uniformly random index below `n` (`n > 0`), from the pool's
    /// own generator (SplitMix64).
    ///
    /// Picks must be uniform, not unpredictable. The state is stepped with a
    /// plain load and store, no lock and no read-modify-write: two threads
    /// drawing at the same instant may get the same number, which only makes
    /// two selections alike. (A thread-local or general-purpose generator
    /// measured slower here than the whole rest of a selection.)
    pub fn random_below(&self, n: usize) -> usize {
        let s = self
            .turns
            .seed
            .load(Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.turns.seed.store(s, Ordering::Relaxed);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Multiply-shift: bias below n / 2^64.
        ((u128::from(z) * n as u128) >> 64) as usize
    }

    /// Two different uniformly random node indices for a two-choice pick
    /// (`None` when there are fewer than two nodes).
    ///
    /// Returns the pair the previous call drew (when it still fits the pool:
    /// nodes may have left since) and draws the next, prefetching those two
    /// nodes' loads so the next pick finds them in cache. Like
    /// [`random_below`](Self::random_below), two simultaneous calls may get
    /// the same pair.
    pub fn random_pair(&self) -> Option<(usize, usize)> {
        let n = self.len();
        if n < 2 {
            return None;
        }
        let drawn = self.turns.ahead.load(Ordering::Relaxed);
        let next = self.draw_pair(n);
        let packed = match (u32::try_from(next.0), u32::try_from(next.1)) {
            (Ok(a), Ok(b)) => (u64::from(a) << 32) | u64::from(b),
            _ => NO_PAIR,
        };
        self.turns.ahead.store(packed, Ordering::Relaxed);
        prefetch(self.load(next.0));
        prefetch(self.load(next.1));
        let (a, b) = ((drawn >> 32) as usize, (drawn as u32) as usize);
        Some(if drawn != NO_PAIR && a < n && b < n && a != b {
            (a, b)
        } else {
            self.draw_pair(n)
        })
    }

    /// Two different uniformly random indices below `n` (`n >= 2`), drawn now.
    fn draw_pair(&self, n: usize) -> (usize, usize) {
        let a = self.random_below(n);
        (a, self.random_other(a, n))
    }

    /// A uniformly random index below `n` (`n >= 2`) other than `a`: a draw
    /// from the other n-1 indices.
    fn random_other(&self, a: usize, n: usize) -> usize {
        let r = self.random_below(n - 1);
        if r >= a {
            r + 1
        } else {
            r
        }
    }

    /// Whether node `i` may be chosen for a request that already tried `excluded`.
    pub fn allowed(&self, i: usize, excluded: &[ProvisionId]) -> bool {
        // Only looks into the node when something is excluded: on a first
        // attempt a selector touches nothing but the statistics it compares.
        excluded.is_empty()
            || !self
                .load(i)
                .is_any_of(excluded, || &self.nodes[i].entry.provision_id)
    }
}

/// Asks the CPU to bring `load` into cache; a hint that changes nothing else.
///
/// The one `unsafe` block of the workspace: a stable safe prefetch does not
/// exist yet. It is sound because a prefetch instruction never faults and
/// never reads into the program (any address is allowed), and here the
/// address is that of a live reference anyway. Other targets go without.
#[allow(unsafe_code)]
#[inline]
fn prefetch(load: &NodeLoad) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: see above: `_mm_prefetch` has no memory effects and cannot
    // fault, and `load` is a valid reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(load).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = load;
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
fn random_allowed(c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
    let n = c.len();
    if n == 0 {
        return None;
    }
    for _ in 0..8 {
        let i = c.random_below(n);
        if c.allowed(i, excluded) {
            return Some(i);
        }
    }
    // Only reached when most of a (then tiny) pool is excluded: bounded by
    // the number of attempts per request, not by the pool size in practice.
    let start = c.random_below(n);
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| c.allowed(i, excluded))
}

/// Two different allowed indices drawn at random (or one, when only one is
/// allowed): the candidates of a power-of-two-choices pick.
fn two_allowed(c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<(usize, Option<usize>)> {
    let n = c.len();
    if let Some((a, b)) = c.random_pair() {
        if c.allowed(a, excluded) && c.allowed(b, excluded) {
            return Some((a, Some(b)));
        }
    }
    // A pool of one, or a pair that hit a node already tried.
    let a = random_allowed(c, excluded)?;
    if n == 1 {
        return Some((a, None));
    }
    for _ in 0..8 {
        let b = c.random_other(a, n);
        if c.allowed(b, excluded) {
            return Some((a, Some(b)));
        }
    }
    let b = (1..n)
        .map(|k| (a + k) % n)
        .find(|&i| c.allowed(i, excluded));
    Some((a, b))
}

/// The better of two candidates by `cmp` on what `read` takes of them
/// (lesser wins); ties go either way at random so equal nodes share the load.
/// Both candidates are read before they are compared, so in a large pool
/// their two cache misses are waited for once, not one after the other.
fn better_of<T>(
    c: &Candidates<'_>,
    pair: (usize, Option<usize>),
    read: impl Fn(usize) -> T,
    cmp: impl Fn(T, T) -> std::cmp::Ordering,
) -> usize {
    let (a, Some(b)) = pair else {
        return pair.0;
    };
    let (ra, rb) = (read(a), read(b));
    match cmp(ra, rb) {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal if c.random_below(2) == 0 => a,
        std::cmp::Ordering::Equal => b,
    }
}

/// Prefers nodes that verification trusts (see [`crate::verify`]): the
/// inner selector's pick, unless that node's verification score is below
/// `min_permille`; then the inner selector is asked again without it (a few
/// times), and the first pick at or above the bar wins. When no node
/// reaches it, the first pick serves: a low score moves traffic away, it
/// does not refuse calls (quarantine does that).
#[derive(Clone, Copy, Debug)]
pub struct VerifiedFirst<S> {
    inner: S,
    min_permille: u16,
}

impl<S: ProvisionSelector> VerifiedFirst<S> {
    /// `inner`, preferring nodes scored at least `min_permille` (of 1,000).
    pub fn new(inner: S, min_permille: u16) -> Self {
        VerifiedFirst {
            inner,
            min_permille,
        }
    }
}

impl<S: ProvisionSelector> ProvisionSelector for VerifiedFirst<S> {
    fn select(&self, c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
        let first = self.inner.select(c, excluded)?;
        let trusted = |i: usize| c.node(i).verification_permille() >= self.min_permille;
        if trusted(first) {
            return Some(first);
        }
        // Rare (a node with a low score was drawn): the copy is cheap next
        // to the call it routes.
        let mut skip = excluded.to_vec();
        let mut pick = first;
        for _ in 0..3 {
            skip.push(c.node(pick).entry.provision_id.clone());
            match self.inner.select(c, &skip) {
                Some(i) if trusted(i) => return Some(i),
                Some(i) => pick = i,
                None => break,
            }
        }
        Some(first)
    }

    fn name(&self) -> &'static str {
        "verified_first"
    }
}

/// Uniformly random choice: the original platform's behaviour.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomSelector;

impl ProvisionSelector for RandomSelector {
    fn select(&self, c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
        // The first of a pair drawn ahead: already on its way into cache.
        match c.random_pair() {
            Some((i, _)) if c.allowed(i, excluded) => Some(i),
            _ => random_allowed(c, excluded),
        }
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
        // The next turn's node, so the next pick finds it in cache.
        prefetch(c.load((start + 1) % n));
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
        if n <= Self::EXACT_UP_TO {
            if n == 0 {
                return None;
            }
            let start = c.random_below(n);
            return (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| c.allowed(i, excluded))
                .min_by_key(|&i| c.load(i).in_flight());
        }
        let pair = two_allowed(c, excluded)?;
        Some(better_of(
            c,
            pair,
            |i| c.load(i).in_flight(),
            |x, y| x.cmp(&y),
        ))
    }

    fn name(&self) -> &'static str {
        "least_in_flight"
    }
}

/// Power of two choices over peak-EWMA load: of two random nodes, the one
/// with the lower latency estimate × (in flight + 1). The default selector.
///
/// Slow nodes lose nearly every comparison and so get a small share; a node
/// that has been idle has its estimate decay (see [`NodeLoad::load_score`])
/// and is tried again, so a node that recovered wins its share back.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeakEwmaSelector;

impl ProvisionSelector for PeakEwmaSelector {
    fn select(&self, c: &Candidates<'_>, excluded: &[ProvisionId]) -> Option<usize> {
        let pair = two_allowed(c, excluded)?;
        Some(better_of(
            c,
            pair,
            |i| c.load(i).snapshot(),
            LoadSnapshot::cmp_load,
        ))
    }

    fn name(&self) -> &'static str {
        "peak_ewma"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PoolEntry, ProviderId, Service};

    fn nodes(n: usize) -> Vec<Arc<Node>> {
        crate::pool::nodes_for_tests(
            (0..n)
                .map(|i| PoolEntry {
                    provision_id: ProvisionId::new(format!("n{i}")),
                    provider_id: ProviderId::new("p"),
                    service: Service::Chat,
                    model: "m".into(),
                    endpoint: "http://x".into(),
                    node_secret: "s".into(),
                    tier: 1,
                    region: String::new(),
                })
                .collect(),
        )
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
            let turns = Turns::default();
            let c = Candidates::new(&ns, &turns);
            let ids: Vec<ProvisionId> = ns.iter().map(|n| n.entry.provision_id.clone()).collect();
            for s in all() {
                for _ in 0..50 {
                    let i = s.select(&c, &ids[1..]).unwrap();
                    assert_eq!(i, 0, "{} at {size}", s.name());
                }
                assert_eq!(s.select(&c, &ids), None, "{}", s.name());
            }
        }
        let empty = nodes(0);
        let turns = Turns::default();
        for s in all() {
            let c = Candidates::new(&empty, &turns);
            assert_eq!(s.select(&c, &[]), None);
        }
    }

    #[test]
    fn draws_are_uniform() {
        let (ns, turns) = (nodes(10), Turns::default());
        let c = Candidates::new(&ns, &turns);
        let mut seen = [0u32; 10];
        for _ in 0..100_000 {
            seen[c.random_below(10)] += 1;
        }
        assert!(
            seen.iter().all(|&k| (9_000..11_000).contains(&k)),
            "{seen:?}"
        );
    }

    #[test]
    fn pairs_are_drawn_one_pick_ahead_and_fit_the_pool_when_used() {
        let (ns, turns) = (nodes(10), Turns::default());
        let c = Candidates::new(&ns, &turns);
        assert_eq!(Candidates::new(&ns[..1], &turns).random_pair(), None);
        let mut seen = [0u32; 10];
        for _ in 0..20_000 {
            let ahead = turns.ahead.load(Ordering::Relaxed);
            let (a, b) = c.random_pair().unwrap();
            if ahead != NO_PAIR {
                assert_eq!((a, b), ((ahead >> 32) as usize, ahead as u32 as usize));
            }
            assert_ne!(a, b);
            seen[a] += 1;
            seen[b] += 1;
        }
        // Each node is in 2 of 10 places of a pair: 4,000 of 20,000 pairs.
        assert!(
            seen.iter().all(|&k| (3_600..4_400).contains(&k)),
            "{seen:?}"
        );
        // The pool shrank after the last pick drew its next pair: a pair
        // that no longer fits is drawn again, within the smaller pool.
        for _ in 0..1_000 {
            let (a, b) = Candidates::new(&ns[..3], &turns).random_pair().unwrap();
            assert!(a < 3 && b < 3 && a != b, "{a} {b}");
            c.random_pair().unwrap();
        }
    }

    #[test]
    fn two_choices_are_distinct() {
        let ns = nodes(2);
        let turns = Turns::default();
        let c = Candidates::new(&ns, &turns);
        for _ in 0..100 {
            let (a, b) = two_allowed(&c, &[]).unwrap();
            assert_ne!(Some(a), b);
        }
    }

    // ---- over the routing index -------------------------------------------------

    use std::collections::HashMap;

    use crate::pool::{PoolIndex, RoutePreferences};

    const MODEL: &str = "llama3.2:3b";

    fn pool_of(n: usize, model: &str) -> (PoolIndex, Vec<ProvisionId>) {
        let ix = PoolIndex::new();
        let ids: Vec<ProvisionId> = (0..n)
            .map(|i| ProvisionId::new(format!("node_{model}_{i}")))
            .collect();
        for id in &ids {
            ix.upsert(
                id,
                vec![PoolEntry {
                    provision_id: id.clone(),
                    provider_id: ProviderId::new("prv"),
                    service: Service::Chat,
                    model: model.into(),
                    endpoint: "http://node.example".into(),
                    node_secret: "s".into(),
                    tier: 3,
                    region: String::new(),
                }],
            );
        }
        (ix, ids)
    }

    #[test]
    fn peak_ewma_sends_a_slow_node_a_small_share() {
        let (ix, ids) = pool_of(3, MODEL);
        let latency: HashMap<ProvisionId, u64> = [
            (ids[0].clone(), 400_000),
            (ids[1].clone(), 20_000),
            (ids[2].clone(), 25_000),
        ]
        .into();
        let mut share: HashMap<ProvisionId, usize> = HashMap::new();
        let sel = PeakEwmaSelector;
        for _ in 0..3_000 {
            let n = ix.select(Service::Chat, MODEL, &sel, &[]).unwrap();
            let _busy = n.start();
            n.observe(latency[&n.entry.provision_id], true);
            *share.entry(n.entry.provision_id.clone()).or_default() += 1;
        }
        let slow = share.get(&ids[0]).copied().unwrap_or(0);
        assert!(slow <= 30, "slow node got {slow} of 3000");
        assert!(share[&ids[1]] > 700 && share[&ids[2]] > 700, "{share:?}");
    }

    #[test]
    fn least_in_flight_balances_in_flight_counts() {
        let sel = LeastInFlightSelector;
        // Small pools are compared whole: exact balance.
        let (ix, ids) = pool_of(3, MODEL);
        let mut held = Vec::new();
        for _ in 0..30 {
            let n = ix.select(Service::Chat, MODEL, &sel, &[]).unwrap();
            held.push((n.entry.provision_id.clone(), n.start()));
        }
        let load = |id: &ProvisionId| ix.in_flight(id);
        assert_eq!(ids.iter().map(load).collect::<Vec<_>>(), [10, 10, 10]);
        // Finishing three requests on one node sends the next three there.
        let target = ids[1].clone();
        let mut dropped = 0;
        held.retain(|(id, _)| {
            if *id == target && dropped < 3 {
                dropped += 1;
                false
            } else {
                true
            }
        });
        for _ in 0..3 {
            let n = ix.select(Service::Chat, MODEL, &sel, &[]).unwrap();
            assert_eq!(n.entry.provision_id, target);
            held.push((n.entry.provision_id.clone(), n.start()));
        }
        // Large pools: the lesser of two random nodes keeps every node near the mean.
        let (ix, ids) = pool_of(200, "big");
        let mut held = Vec::new();
        for _ in 0..2_000 {
            let n = ix.select(Service::Chat, "big", &sel, &[]).unwrap();
            held.push(n.start());
        }
        let loads: Vec<u32> = ids.iter().map(|id| ix.in_flight(id)).collect();
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(
            *max <= 16 && *min >= 4,
            "in flight ranges {min}..{max} around a mean of 10"
        );
    }

    #[test]
    fn round_robin_is_even_per_pool() {
        let (ix, ids) = pool_of(4, MODEL);
        let sel = RoundRobinSelector;
        let mut count: HashMap<ProvisionId, usize> = HashMap::new();
        for _ in 0..400 {
            let n = ix.select(Service::Chat, MODEL, &sel, &[]).unwrap();
            *count.entry(n.entry.provision_id.clone()).or_default() += 1;
        }
        assert!(ids.iter().all(|id| count[id] == 100), "{count:?}");
        // Two pools used in turn do not skew each other.
        let (ix, _) = pool_of(2, "a");
        for id in pool_of(2, "b").1 {
            ix.upsert(
                &id,
                vec![PoolEntry {
                    provision_id: id.clone(),
                    provider_id: ProviderId::new("prv"),
                    service: Service::Chat,
                    model: "b".into(),
                    endpoint: "http://node.example".into(),
                    node_secret: "s".into(),
                    tier: 3,
                    region: String::new(),
                }],
            );
        }
        let mut a: HashMap<ProvisionId, usize> = HashMap::new();
        for _ in 0..100 {
            let n = ix.select(Service::Chat, "a", &sel, &[]).unwrap();
            *a.entry(n.entry.provision_id.clone()).or_default() += 1;
            ix.select(Service::Chat, "b", &sel, &[]).unwrap();
        }
        assert_eq!(a.values().copied().collect::<Vec<_>>(), [50, 50]);
    }

    #[test]
    fn a_preferred_region_is_served_first_and_others_serve_when_it_has_none() {
        let ix = PoolIndex::new();
        for (id, region) in [("de1", "DE"), ("de2", "de"), ("us1", "US")] {
            let id = ProvisionId::new(id);
            ix.upsert(
                &id,
                vec![PoolEntry {
                    provision_id: id.clone(),
                    provider_id: ProviderId::new("prv"),
                    service: Service::Chat,
                    model: MODEL.into(),
                    endpoint: "http://node.example".into(),
                    node_secret: "s".into(),
                    tier: 3,
                    region: region.into(),
                }],
            );
        }
        let de = RoutePreferences::region(" De ");
        for _ in 0..50 {
            let n = ix
                .select_with(Service::Chat, MODEL, &PeakEwmaSelector, &[], &de)
                .unwrap();
            assert!(n.entry.provision_id.as_str().starts_with("de"));
        }
        let tried = [ProvisionId::new("de1"), ProvisionId::new("de2")];
        let n = ix
            .select_with(Service::Chat, MODEL, &PeakEwmaSelector, &tried, &de)
            .unwrap();
        assert_eq!(n.entry.provision_id.as_str(), "us1");
        ix.set_healthy(&ProvisionId::new("us1"), false);
        assert!(ix
            .select_with(Service::Chat, MODEL, &PeakEwmaSelector, &tried, &de)
            .is_none());
    }
}
