//! The in-memory routing index: for each (service, model), the nodes that
//! serve it, with live per-node statistics.
//!
//! Routing reads only this index (never the store). Joins, leaves and health
//! changes are O(1) per pool entry: each pool is a vector plus a position map,
//! and removal is a swap-remove. Each pool also keeps one sub-pool per region
//! (the node's country), so a request that prefers a region is served in O(1)
//! as well.
//!
//! ## Memory layout (what a selection touches)
//!
//! A pool is a dense vector of `Arc<Node>` (8 bytes a node). Each [`Node`]
//! (one pool entry of a provision) starts with its [`NodeLoad`], the numbers
//! selectors compare (requests in flight, peak-EWMA latency and its stamp, a
//! hash of the provision id), so they sit beside the `Arc`'s reference count:
//! comparing two random nodes and taking the winner costs one cache miss per
//! candidate, both issued before either is compared, and the winner's clone
//! usually hits the line just read. In a pool larger than the caches those
//! misses are most of a selection's cost, so selectors draw candidates one
//! pick ahead and prefetch them (see [`crate::select`] and
//! `benches/routing.rs`). The provision-wide
//! part ([`NodeStats`]: totals, circuit breaker) is shared by a node's
//! entries and never read while choosing.
//!
//! Load is therefore tracked per pool entry, the way a load balancer tracks
//! each endpoint: a node's latency on one model says little about another,
//! and requests in flight on another model show up as its latency rises.
//! [`NodeStats`] keeps the provision's totals for display.
//!
//! Per-node statistics are atomics, so the request path records latency, load
//! and outcomes without taking any lock.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use crate::health::NodeHealth;
use crate::select::{Candidates, ProvisionSelector, Turns};
use crate::types::{PoolEntry, ProvisionId, Route, Service};

/// How fast a latency estimate forgets a slow sample when no new sample
/// arrives: after this long only 1/e of the excess is left. Long enough that
/// one slow answer keeps a node out of favour for a while, short enough that
/// a node that recovered is tried again within a minute.
pub(crate) const EWMA_DECAY_US: u64 = 10_000_000;

/// The load score of a node that has answered nothing yet while requests to
/// it are in flight (per request): so large that it is avoided until its
/// first answer. With nothing in flight its score is 0, so a new node is
/// tried at once, one request at a time, and then ranked by what it did.
pub(crate) const UNMEASURED_PENALTY_US: u64 = u64::MAX >> 16;

/// The least latency a failure counts as (1 s). A node failing fast (a
/// refused connection) must not look like the fastest node.
pub(crate) const FAILURE_PENALTY_US: u64 = 1_000_000;

/// Microseconds on a process-wide monotonic clock: the time base of
/// [`LoadSnapshot::load_score_at`]. Latency estimates decay with real elapsed
/// time; they are heuristics for choosing a node and never decide money or
/// expiry, so they do not use the broker's [`Clock`](crate::Clock).
pub(crate) fn mono_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The time unit of a [`PeakEwma`]'s stamp: 8 ms. Decay works on a scale of
/// seconds; with 32 bits the stamp wraps after 397 days and differences stay
/// exact for idle times under 199 days.
const STAMP_UNIT_US: u64 = 8_000;

/// A peak-EWMA latency estimate and the time of its last sample, packed in
/// one atomic word (estimate in microseconds, saturating at about 71 minutes,
/// in the high half; the stamp in [`STAMP_UNIT_US`] units, wrapping, in the
/// low half), so a reader always sees an estimate with its own stamp and a
/// selector reads both with one load.
#[derive(Debug, Default)]
struct PeakEwma(AtomicU64);

fn stamp_of(now_us: u64) -> u32 {
    // Wrapping on purpose: only differences between stamps matter.
    (now_us / STAMP_UNIT_US) as u32
}

fn unpack_ewma(v: u64) -> (u64, u32) {
    (v >> 32, v as u32)
}

fn pack_ewma(ewma_us: u64, stamp: u32) -> u64 {
    (ewma_us.min(u64::from(u32::MAX)) << 32) | u64::from(stamp)
}

/// Microseconds from `stamp` to `now_us`; 0 when `now_us` is not later (a
/// time read just before another thread stamped a sample).
fn idle_us(stamp: u32, now_us: u64) -> u64 {
    let units = stamp_of(now_us).wrapping_sub(stamp) as i32;
    u64::from(units.max(0).unsigned_abs()) * STAMP_UNIT_US
}

impl PeakEwma {
    /// The estimate as last recorded (0 before the first sample).
    fn raw_us(&self) -> u64 {
        unpack_ewma(self.0.load(Ordering::Relaxed)).0
    }

    /// Folds in a sample taken at `now_us`. A sample above the estimate
    /// replaces it at once; a lower one pulls it down with a weight that
    /// grows with the time since the last sample.
    fn observe(&self, sample_us: u64, now_us: u64) {
        let stamp = stamp_of(now_us);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                let (old, then) = unpack_ewma(v);
                let new = if old == 0 || sample_us >= old {
                    sample_us
                } else {
                    // `old > sample` here, so the result stays in [sample, old].
                    sample_us + decay(old - sample_us, idle_us(then, now_us))
                };
                Some(pack_ewma(new.max(1), stamp))
            });
    }
}

impl PeakEwma {
    /// Raises the estimate to `sample_us` if it is higher; a lower sample
    /// changes nothing (it is a lower bound, not a measurement).
    fn observe_peak(&self, sample_us: u64, now_us: u64) {
        let stamp = stamp_of(now_us);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                let (old, _) = unpack_ewma(v);
                (sample_us > old).then(|| pack_ewma(sample_us, stamp))
            });
    }
}

/// The estimate of a packed [`PeakEwma`] word at `now_us`: the recorded one
/// decayed toward zero by the time since it was recorded (so an idle node is
/// tried again); 0 before the first sample.
fn estimate_of(packed: u64, now_us: u64) -> u64 {
    let (ewma, stamp) = unpack_ewma(packed);
    if ewma == 0 {
        return 0;
    }
    match idle_us(stamp, now_us) {
        0 => ewma,
        idle => decay(ewma, idle).max(1),
    }
}

/// The sample a failure counts as: at least twice the current estimate and
/// [`FAILURE_PENALTY_US`].
fn failure_sample(latency_us: u64, estimate_us: u64) -> u64 {
    latency_us
        .max(estimate_us.saturating_mul(2))
        .max(FAILURE_PENALTY_US)
}

/// The statistics of one provision, shared by all its pool entries: outcome
/// counts and the circuit breaker. Never read while choosing a node (the
/// numbers selectors compare live in each [`Node`]); the provision's load is
/// derived from its entries' ([`PoolIndex::in_flight`],
/// [`PoolIndex::latency_ewma_us`]), not kept twice.
///
/// Aligned to a cache line so two nodes' counters never share one (requests
/// on different nodes then do not slow each other down).
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct NodeStats {
    requests: AtomicU64,
    failures: AtomicU64,
    /// The node's circuit breaker and probe state.
    health: NodeHealth,
    /// How far the node's verification score is below full marks, per
    /// mille (see [`crate::verify`]): stored as a shortfall so a new node
    /// starts at full marks with the derived default.
    verification_shortfall: AtomicU32,
}

impl NodeStats {
    /// Requests completed (successes and failures).
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Failed requests.
    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The node's circuit breaker (see [`crate::health`]).
    pub(crate) fn health(&self) -> &NodeHealth {
        &self.health
    }

    /// The node's verification score, per mille (see [`crate::verify`]).
    pub(crate) fn verification_permille(&self) -> u16 {
        let short = self
            .verification_shortfall
            .load(Ordering::Relaxed)
            .min(1000);
        1000 - short as u16
    }

    /// Sets the node's verification score, per mille (at most 1,000).
    pub(crate) fn set_verification_permille(&self, score: u16) {
        let short = 1000 - u32::from(score.min(1000));
        self.verification_shortfall.store(short, Ordering::Relaxed);
    }
}

/// `value × e^(-dt/τ)` (τ = [`EWMA_DECAY_US`]): what is left of an old
/// estimate after `dt_us`, to within 0.1%.
///
/// Integer arithmetic, because selectors compute it for every candidate and
/// a floating-point `exp` cost more than the rest of a selection:
/// `e^(-dt/τ) = 2^(-dt/(τ·ln 2))`, the whole halvings as a shift, the
/// fraction from a table of sixteenths of a halving, linearly interpolated.
fn decay(value: u64, dt_us: u64) -> u64 {
    /// `2^(-i/16)` in 1/65536ths.
    const FRACTION: [u64; 17] = [
        65536, 62757, 60097, 57549, 55109, 52773, 50535, 48393, 46341, 44376, 42495, 40693, 38968,
        37316, 35734, 34219, 32768,
    ];
    /// Halvings per microsecond in 1/2^48ths: `2^48 / (τ · ln 2)`.
    const HALVINGS: u128 = (1u128 << 48) * 1_000_000_000 / (EWMA_DECAY_US as u128 * 693_147_181);
    // Halvings in 1/65536ths (fits: dt below 2^64 gives under 2^64 × 2^26 / 2^32).
    let q = (u128::from(dt_us) * HALVINGS) >> 32;
    let whole = q >> 16;
    if whole >= 64 {
        return 0;
    }
    let frac = (q & 0xFFFF) as usize;
    let (i, rest) = (frac >> 12, (frac & 0xFFF) as u64);
    let m = FRACTION[i] - (((FRACTION[i] - FRACTION[i + 1]) * rest) >> 12);
    ((u128::from(value >> whole) * u128::from(m)) >> 16) as u64
}

/// A started request on a node; finishing (drop) decrements the entry's
/// in-flight count.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Node>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.load().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live load of one pool entry: what selectors compare. 16 bytes, at the
/// start of its [`Node`] (see the module docs).
#[derive(Debug)]
pub struct NodeLoad {
    in_flight: AtomicU32,
    /// A hash of the provision id, so skipping the nodes a request already
    /// tried rarely has to read the id itself (a cache miss).
    id_tag: u32,
    latency: PeakEwma,
}

impl NodeLoad {
    /// Requests to the entry in flight right now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The entry's latency estimate in microseconds as last recorded (0
    /// before the first sample), without the decay since then.
    pub fn ewma_us(&self) -> u64 {
        self.latency.raw_us()
    }

    /// The load score used by peak-EWMA selection: latency estimate ×
    /// (in-flight + 1); for an entry not measured yet, 0 when idle and
    /// a penalty so large per request in flight otherwise that it is avoided
    /// until its first answer. Lower is better.
    pub fn load_score(&self) -> u64 {
        self.snapshot().load_score_at(mono_us())
    }

    /// The numbers as they are now, read with two plain loads and no
    /// arithmetic: a selector reads every candidate's snapshot before scoring
    /// any, so the candidates' cache misses overlap instead of each waiting
    /// for the previous score's branches.
    pub fn snapshot(&self) -> LoadSnapshot {
        LoadSnapshot {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency: self.latency.0.load(Ordering::Relaxed),
        }
    }

    /// Whether this is the load of an entry of one of the provisions `ids`
    /// (`id_of` reads the entry's id, only when its hash matches).
    pub(crate) fn is_any_of<'a>(
        &self,
        ids: &[ProvisionId],
        id_of: impl Fn() -> &'a ProvisionId,
    ) -> bool {
        ids.iter()
            .any(|id| id_tag(id) == self.id_tag && id == id_of())
    }
}

/// One routable pool entry of a provision: what the store says about it, its
/// live load and its provision's shared statistics.
///
/// `repr(C)` with the load first: inside an `Arc` it follows the reference
/// counts directly, so a selector's read and the winner's clone usually touch
/// one cache line (see the module docs).
#[derive(Debug)]
#[repr(C)]
pub struct Node {
    load: NodeLoad,
    /// What the store says about the entry.
    pub entry: PoolEntry,
    /// The provision's shared statistics and circuit breaker.
    pub(crate) stats: Arc<NodeStats>,
    /// The entry's region, normalised by [`normalize_region`] (empty: none).
    region: String,
    /// What a call sends, made once when the node joins rather than per
    /// call (parsing the endpoint, IDNA included, and formatting the secret):
    /// the URI of each route (by [`Route`] as index; `None` if the endpoint
    /// does not parse) and the `Authorization` value.
    uris: [Option<http::Uri>; Route::ALL.len()],
    auth: Option<http::HeaderValue>,
}

/// `path` after the endpoint's own path, if any.
fn joined(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = base.clone();
    let full = format!("{}{path}", url.path().trim_end_matches('/'));
    url.set_path(&full);
    url
}

impl Node {
    fn new(entry: PoolEntry, stats: Arc<NodeStats>) -> Self {
        let base_url = reqwest::Url::parse(&entry.endpoint).ok();
        let uris = Route::ALL.map(|r| {
            let url = joined(base_url.as_ref()?, r.path());
            http::Uri::try_from(url.as_str()).ok()
        });
        let auth = http::HeaderValue::try_from(format!("Bearer {}", entry.node_secret))
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        Node {
            uris,
            auth,
            load: NodeLoad {
                in_flight: AtomicU32::new(0),
                id_tag: id_tag(&entry.provision_id),
                latency: PeakEwma::default(),
            },
            region: normalize_region(&entry.region),
            entry,
            stats,
        }
    }

    /// What a call on `route` is sent with: the URI and the `Authorization`
    /// value, both prepared when the node joined; `None` when the endpoint
    /// or the secret cannot make them (the call then fails as unreachable).
    pub(crate) fn request_target(&self, route: Route) -> Option<(http::Uri, http::HeaderValue)> {
        Some((self.uris[route as usize].clone()?, self.auth.clone()?))
    }

    /// The entry's live load, as selectors see it.
    pub fn load(&self) -> &NodeLoad {
        &self.load
    }

    /// The node's verification score from canary calls, per mille (1,000:
    /// nothing found against it; see `docs/ARCHITECTURE.md`, "Verification"),
    /// for selectors that weigh it (e.g. [`crate::select::VerifiedFirst`]).
    pub fn verification_permille(&self) -> u16 {
        self.stats.verification_permille()
    }

    /// Marks a request started; the guard marks it finished when dropped.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.load().in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a finished request's latency (on the entry: what selectors
    /// compare) and outcome (on the provision's counts).
    ///
    /// Peak-EWMA: a sample above the estimate replaces it at once (so a node
    /// that turns slow is avoided immediately); a lower one pulls it down with
    /// a weight that grows with the time since the last sample (so a burst of
    /// fast answers does not hide a slow node, but a node that stays fast is
    /// believed within seconds). A failure counts as a sample of at least
    /// twice the current estimate and [`FAILURE_PENALTY_US`].
    pub(crate) fn observe(&self, latency_us: u64, success: bool) {
        let now = mono_us();
        let (mine, s) = (&self.load().latency, &self.stats);
        s.requests.fetch_add(1, Ordering::Relaxed);
        let sample = if success {
            latency_us
        } else {
            s.failures.fetch_add(1, Ordering::Relaxed);
            failure_sample(latency_us, mine.raw_us())
        };
        mine.observe(sample, now);
    }
}

impl Node {
    /// Records that a request to the entry has been waiting `waited_us` and
    /// is not over: the latency estimate rises to it at once (a peak), so a
    /// call in flight longer than the node's usual latency counts as that
    /// slow before it ends. Nothing is counted as a finished request.
    pub(crate) fn observe_outstanding(&self, waited_us: u64) {
        self.load().latency.observe_peak(waited_us, mono_us());
    }
}

/// See [`NodeLoad::is_any_of`].
fn id_tag(id: &ProvisionId) -> u32 {
    let mut h = FastHasher::default();
    h.write(id.as_str().as_bytes());
    // The high half: a multiplicative hash mixes its upper bits best.
    (h.finish() >> 32) as u32
}

/// A region as the index keys it: trimmed and upper-cased (`de` and ` DE`
/// are the same region).
pub(crate) fn normalize_region(region: &str) -> String {
    region.trim().to_ascii_uppercase()
}

/// What a request asks of the node it is routed to, beyond its pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePreferences {
    region: Option<String>,
    /// Only this node, routable or quarantined (a canary call, see
    /// [`crate::verify`]); a node out of routing for its health is not sent it.
    pin: Option<ProvisionId>,
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
            pin: None,
        }
    }

    /// Only node `id` (its entry of the call's pool), even while it is
    /// quarantined: the broker's canary calls.
    pub(crate) fn pinned(id: ProvisionId) -> Self {
        RoutePreferences {
            region: None,
            pin: Some(id),
        }
    }

    /// The preferred region, normalised.
    pub fn preferred_region(&self) -> Option<&str> {
        self.region.as_deref()
    }
}

/// One list of routable nodes with O(1) insert and remove.
#[derive(Debug, Default)]
struct Pool {
    nodes: Vec<Arc<Node>>,
    pos: HashMap<ProvisionId, usize>,
    /// Round-robin position and random state: each pool has its own, so
    /// pools used in turn do not skew one another.
    turns: Turns,
}

impl Pool {
    fn insert(&mut self, node: Arc<Node>) {
        match self.pos.get(&node.entry.provision_id) {
            Some(&i) => self.nodes[i] = node,
            None => {
                self.pos
                    .insert(node.entry.provision_id.clone(), self.nodes.len());
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
            if let Some(p) = self.pos.get_mut(&moved.entry.provision_id) {
                *p = i;
            }
        }
        true
    }

    /// Picks a node with `selector`.
    fn select(
        &self,
        selector: &dyn ProvisionSelector,
        excluded: &[ProvisionId],
    ) -> Option<Arc<Node>> {
        if self.nodes.is_empty() {
            return None;
        }
        let c = Candidates::new(&self.nodes, &self.turns);
        let i = selector.select(&c, excluded)?;
        self.nodes.get(i).cloned()
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
        if node.region.is_empty() {
            return;
        }
        match self.by_region.get_mut(&node.region) {
            Some(p) => p.insert(node.clone()),
            None => {
                let mut p = Pool::default();
                p.insert(node.clone());
                self.by_region.insert(node.region.clone(), p);
            }
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
    /// Quarantined by verification (see [`crate::verify`]): out of routing
    /// whatever its health, until it passes canaries again.
    quarantined: bool,
}

impl NodeRecord {
    /// Whether its entries are in the pools.
    fn routable(&self) -> bool {
        self.healthy && !self.quarantined
    }
}

/// A copy of a [`NodeLoad`] taken by [`NodeLoad::snapshot`].
#[derive(Clone, Copy, Debug)]
pub struct LoadSnapshot {
    in_flight: u32,
    /// The packed [`PeakEwma`] word.
    latency: u64,
}

impl LoadSnapshot {
    /// Requests in flight when the snapshot was taken.
    pub fn in_flight(self) -> u32 {
        self.in_flight
    }

    /// [`NodeLoad::load_score`] at `now_us` on [`mono_us`]. Selectors do not
    /// score (they compare with [`LoadSnapshot::cmp_load`], reading no clock).
    pub(crate) fn load_score_at(self, now_us: u64) -> u64 {
        score(self.in_flight, estimate_of(self.latency, now_us))
    }

    /// Orders two snapshots by [load score](NodeLoad::load_score) as it would
    /// be at any instant after both were stamped, without reading a clock.
    ///
    /// Both estimates decay at the same rate, so their ratio is the same at
    /// every later instant: aging the older one to the newer one's stamp
    /// orders them as at "now", with one decay computed instead of two.
    pub fn cmp_load(self, other: LoadSnapshot) -> std::cmp::Ordering {
        // Written as selects rather than branches, like `decay`: it runs on
        // every pick.
        let ((ea, ta), (eb, tb)) = (unpack_ewma(self.latency), unpack_ewma(other.latency));
        // Stamp difference in units, wrapping like the stamps themselves.
        let d = tb.wrapping_sub(ta) as i32;
        let a_older = d >= 0;
        let older = if a_older { ea } else { eb };
        let aged = decay(older, u64::from(d.unsigned_abs()) * STAMP_UNIT_US).max(1);
        // An unmeasured estimate (0) stays 0: its score does not decay.
        let ea = if a_older && ea != 0 { aged } else { ea };
        let eb = if !a_older && eb != 0 { aged } else { eb };
        wide_score(self.in_flight, ea).cmp(&wide_score(other.in_flight, eb))
    }
}

/// The load score of an entry with `in_flight` requests and latency
/// estimate `estimate_us` (0: not measured yet).
fn score(in_flight: u32, estimate_us: u64) -> u64 {
    u64::try_from(wide_score(in_flight, estimate_us)).unwrap_or(u64::MAX)
}

/// [`score`] in 128 bits, where it cannot overflow, so computing it needs no
/// saturation branches.
fn wide_score(in_flight: u32, estimate_us: u64) -> u128 {
    let n = u128::from(in_flight);
    if estimate_us == 0 {
        u128::from(UNMEASURED_PENALTY_US) * n
    } else {
        u128::from(estimate_us) * (n + 1)
    }
}

/// A fast hash (FxHash's multiply-rotate) for provision ids' tags: a tag
/// only ever speeds up a comparison, so a crafted collision costs nothing.
/// Maps keyed by names strangers choose use [`ByModel`]'s keyed hash.
#[derive(Default)]
pub(crate) struct FastHasher(u64);

impl Hasher for FastHasher {
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

/// Models of one service, by name (looked up by `&str`, no allocation).
///
/// Keyed SipHash (std's `RandomState`, a random key per map), not a fast
/// unkeyed hash: any provider may register a node, and the one-step
/// register path names models freely, so a stranger could otherwise pick
/// names that all collide and turn every lookup (and every index update,
/// under its write lock) into a scan. The ~20 ns it costs per lookup is a
/// small part of a call.
pub(crate) type ByModel<V> = HashMap<String, V, std::collections::hash_map::RandomState>;

/// Per service, by [`service_slot`]: a plain array instead of a hash lookup.
type PerService<V> = [ByModel<V>; Service::ALL.len()];

/// The position of a service in a [`PerService`] array (or any array of
/// [`Service::ALL`]'s length).
pub(crate) fn service_slot(s: Service) -> usize {
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
    /// Nodes verification quarantined, in the index or not: one that joins
    /// again (ended and started, refreshed) is still out.
    quarantined: HashSet<ProvisionId>,
}

impl Index {
    fn route(&mut self, node: &Arc<Node>) {
        let by_model = &mut self.pools[service_slot(node.entry.service)];
        // Looked up by `&str` first: the key is copied only for a new pool.
        match by_model.get_mut(node.entry.model.as_str()) {
            Some(p) => p.insert(node),
            None => {
                let mut p = ModelPool::default();
                p.insert(node);
                by_model.insert(node.entry.model.clone(), p);
            }
        }
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
            match by_model.get_mut(node.entry.model.as_str()) {
                Some(n) => *n += 1,
                None => {
                    by_model.insert(node.entry.model.clone(), 1);
                }
            }
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
            locked_step();
            if rec.routable() {
                self.unroute(n);
            }
            self.count_offer(n, false);
        }
        Some(rec)
    }
}

#[cfg(test)]
thread_local!(static LOCKED_STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) });

/// One step of work under the index's write lock: tests count them, to hold
/// an update's time under the lock in proportion to the entries it changes.
fn locked_step() {
    #[cfg(test)]
    LOCKED_STEPS.with(|c| c.set(c.get() + 1));
}

/// The routing index. Cheap reads under a read lock; O(1) updates per entry.
///
/// A node's entries come from a stranger, so an update does everything that
/// allocates or compares entries (dropping duplicates, building nodes,
/// finding the ones that stay) before it takes the write lock; under the
/// lock it only unlinks the old entries and links the new ones, so routing
/// waits for work in proportion to the entries changed, never more.
#[derive(Debug, Default)]
pub(crate) struct PoolIndex {
    index: RwLock<Index>,
    /// Held by every change of a node's entries ([`PoolIndex::upsert`],
    /// [`PoolIndex::remove`]) from reading the node's record to replacing it,
    /// so the record an update prepared from is still the one it replaces.
    /// Routing never takes it.
    membership: Mutex<()>,
}

/// Some of the index's pools and how many there are in all: the
/// catalogue's first, then the largest (see [`crate::Broker::listed_pools`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListedPools {
    /// The pools listed, with their routable node counts, sorted by
    /// (service, model).
    pub pools: Vec<(Service, String, usize)>,
    /// How many pools the index has, listed or not.
    pub total: usize,
}

impl ListedPools {
    /// How many pools were left out.
    pub fn omitted(&self) -> usize {
        self.total.saturating_sub(self.pools.len())
    }
}

impl PoolIndex {
    /// An empty index.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The live statistics of a node in the index.
    pub(crate) fn stats(&self, id: &ProvisionId) -> Option<Arc<NodeStats>> {
        self.index.read().nodes.get(id).map(|r| r.stats.clone())
    }

    /// Requests a node is serving right now, over all its entries (0 for a
    /// node not in the index).
    pub(crate) fn in_flight(&self, id: &ProvisionId) -> u32 {
        self.index
            .read()
            .nodes
            .get(id)
            .map_or(0, |r| r.nodes.iter().map(|n| n.load().in_flight()).sum())
    }

    /// A node's latency estimate in microseconds, as last recorded: that of
    /// its slowest entry (0 before any sample, or for a node not in the index).
    pub(crate) fn latency_ewma_us(&self, id: &ProvisionId) -> u64 {
        self.index.read().nodes.get(id).map_or(0, |r| {
            r.nodes
                .iter()
                .map(|n| n.load().ewma_us())
                .max()
                .unwrap_or(0)
        })
    }

    /// Sets a node's entries (replacing any it had): it joins exactly these
    /// pools. Its statistics and health mark are kept. No entries: the node
    /// leaves the index. A (service, model) listed twice counts once.
    pub(crate) fn upsert(&self, id: &ProvisionId, mut entries: Vec<PoolEntry>) {
        // One entry per (service, model): a duplicate would count twice.
        // Checked with a set, before any lock.
        let keep: Vec<bool> = {
            let mut seen = HashSet::with_capacity(entries.len());
            (entries.iter())
                .map(|e| seen.insert((e.service, e.model.as_str())))
                .collect()
        };
        let mut keep = keep.into_iter();
        entries.retain(|_| keep.next().unwrap_or(false));
        let _membership = self.membership.lock();
        if entries.is_empty() {
            let gone = self.index.write().detach(id);
            drop(gone);
            return;
        }
        // The node's record as it is; no other change of membership can
        // replace it before this one is done.
        let (stats, before) = {
            let ix = self.index.read();
            ix.nodes
                .get(id)
                .map(|r| (r.stats.clone(), r.nodes.clone()))
                .unwrap_or_default()
        };
        // An unchanged entry keeps its node, and so its live load.
        let by_key: HashMap<(Service, &str), &Arc<Node>> = (before.iter())
            .map(|n| ((n.entry.service, n.entry.model.as_str()), n))
            .collect();
        let nodes: Vec<Arc<Node>> = entries
            .into_iter()
            .map(|e| {
                let same = (by_key.get(&(e.service, e.model.as_str())))
                    .filter(|n| n.entry == e)
                    .map(|n| Arc::clone(n));
                same.unwrap_or_else(|| Arc::new(Node::new(e, stats.clone())))
            })
            .collect();
        drop(by_key);
        let mut ix = self.index.write();
        let old = ix.detach(id);
        // A health verdict given meanwhile is the one that holds.
        let healthy = old.as_ref().is_none_or(|r| r.healthy);
        let quarantined = ix.quarantined.contains(id);
        for n in &nodes {
            locked_step();
            ix.count_offer(n, true);
            if healthy && !quarantined {
                ix.route(n);
            }
        }
        ix.nodes.insert(
            id.clone(),
            NodeRecord {
                nodes,
                stats,
                healthy,
                quarantined,
            },
        );
        drop(ix);
        // The old record and `before` are freed after the lock is released.
        drop((old, before));
    }

    /// Removes a node from every pool, with its statistics and health mark.
    pub(crate) fn remove(&self, id: &ProvisionId) {
        let _membership = self.membership.lock();
        let gone = self.index.write().detach(id);
        drop(gone);
    }

    /// Takes a node out of routing (`false`) or puts it back (`true`), keeping
    /// its entries. Unknown nodes are ignored: a health verdict about a node
    /// that has left must not stick to it if it joins again.
    pub(crate) fn set_healthy(&self, id: &ProvisionId, healthy: bool) {
        let mut ix = self.index.write();
        let Some(rec) = ix.nodes.get_mut(id) else {
            return;
        };
        if rec.healthy == healthy {
            return;
        }
        let was = rec.routable();
        rec.healthy = healthy;
        Self::reroute(&mut ix, id, was);
    }

    /// Quarantines a node (`true`: out of routing whatever its health) or
    /// lets it back (`false`), keeping its entries. Unlike a health verdict
    /// the mark holds for a node not in the index now, should it join again.
    pub(crate) fn set_quarantined(&self, id: &ProvisionId, quarantined: bool) {
        let mut ix = self.index.write();
        if quarantined {
            ix.quarantined.insert(id.clone());
        } else {
            ix.quarantined.remove(id);
        }
        let Some(rec) = ix.nodes.get_mut(id) else {
            return;
        };
        if rec.quarantined == quarantined {
            return;
        }
        let was = rec.routable();
        rec.quarantined = quarantined;
        Self::reroute(&mut ix, id, was);
    }

    /// Puts a node's entries in or out of the pools after its record's
    /// marks changed, when it was routable (`was`) and is no longer, or
    /// the reverse.
    fn reroute(ix: &mut Index, id: &ProvisionId, was: bool) {
        let Some(rec) = ix.nodes.get(id) else {
            return;
        };
        let now = rec.routable();
        if now == was {
            return;
        }
        let nodes = rec.nodes.clone();
        for n in &nodes {
            if now {
                ix.route(n);
            } else {
                ix.unroute(n);
            }
        }
    }

    /// Whether a node is currently routable: healthy and not quarantined.
    pub(crate) fn is_healthy(&self, id: &ProvisionId) -> bool {
        self.index
            .read()
            .nodes
            .get(id)
            .is_some_and(|r| r.routable())
    }

    /// How many nodes in the index are quarantined.
    pub(crate) fn quarantined_count(&self) -> usize {
        let ix = self.index.read();
        ix.nodes.values().filter(|r| r.quarantined).count()
    }

    /// Whether verification has quarantined a node.
    pub(crate) fn is_quarantined(&self, id: &ProvisionId) -> bool {
        self.index
            .read()
            .nodes
            .get(id)
            .is_some_and(|r| r.quarantined)
    }

    /// Replaces the whole index with `entries` (grouped by node), keeping
    /// health marks and live stats of nodes that stay.
    pub(crate) fn rebuild(&self, entries: Vec<PoolEntry>) {
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
    pub(crate) fn is_offered(&self, service: Service, model: &str) -> bool {
        self.index.read().offered[service_slot(service)].contains_key(model)
    }

    #[cfg(any(test, feature = "testkit"))]
    /// Picks a routable node for (service, model) with `selector`, skipping `excluded`.
    pub(crate) fn select(
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
    pub(crate) fn select_with(
        &self,
        service: Service,
        model: &str,
        selector: &dyn ProvisionSelector,
        excluded: &[ProvisionId],
        prefs: &RoutePreferences,
    ) -> Option<Arc<Node>> {
        let ix = self.index.read();
        if let Some(pin) = &prefs.pin {
            // A canary: that node's entry of the pool, healthy, quarantined or not.
            let rec = ix.nodes.get(pin).filter(|r| r.healthy)?;
            return (rec.nodes.iter())
                .find(|n| n.entry.service == service && n.entry.model == model)
                .filter(|_| !excluded.contains(pin))
                .cloned();
        }
        let mp = ix.pools[service_slot(service)].get(model)?;
        if let Some(p) = prefs.region.as_deref().and_then(|r| mp.by_region.get(r)) {
            if let Some(n) = p.select(selector, excluded) {
                return Some(n);
            }
        }
        mp.all.select(selector, excluded)
    }

    #[cfg(test)]
    /// Every pool with its routable node count, sorted. As long as strangers
    /// make it: public lists use [`PoolIndex::listed`].
    pub(crate) fn summary(&self) -> Vec<(Service, String, usize)> {
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

    /// At most `limit` pools, for lists that must stay short whatever
    /// strangers register (public pages): the pools `first` picks before the
    /// others, then the largest, ties by (service, model); and how many pools
    /// there are in all. One read of the index, no name copied but the
    /// listed ones'.
    pub(crate) fn listed(
        &self,
        limit: usize,
        first: impl Fn(Service, &str) -> bool,
    ) -> ListedPools {
        let ix = self.index.read();
        let mut all: Vec<(bool, Reverse<usize>, Service, &str)> = Service::ALL
            .iter()
            .flat_map(|s| {
                ix.pools[service_slot(*s)]
                    .iter()
                    .map(|(m, p)| (!first(*s, m), Reverse(p.all.nodes.len()), *s, m.as_str()))
            })
            .collect();
        let total = all.len();
        if total > limit {
            all.select_nth_unstable(limit);
            all.truncate(limit);
        }
        let mut pools: Vec<(Service, String, usize)> = all
            .into_iter()
            .map(|(_, Reverse(n), s, m)| (s, m.to_owned(), n))
            .collect();
        drop(ix);
        pools.sort();
        ListedPools { pools, total }
    }

    /// Routable nodes in the pool of (service, model) (0 when it has none).
    pub(crate) fn pool_size(&self, service: Service, model: &str) -> usize {
        let ix = self.index.read();
        ix.pools[service_slot(service)]
            .get(model)
            .map_or(0, |p| p.all.nodes.len())
    }

    /// How many nodes (healthy or not) offer each (service, model): what the
    /// network has, for assigning services to new nodes.
    pub(crate) fn coverage(&self) -> HashMap<(Service, String), usize> {
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

    #[cfg(any(test, feature = "testkit"))]
    /// The ids of every node in the index.
    pub(crate) fn node_ids(&self) -> Vec<ProvisionId> {
        self.index.read().nodes.keys().cloned().collect()
    }

    /// Every node in the index, routable or not, as the nodes of its entries
    /// (never empty; they share the provision's [`NodeStats`]), taken in one
    /// read: rounds that visit every node (probes, network snapshots) need
    /// no lookup, and no copy of an entry, per node.
    pub(crate) fn provisions(&self) -> Vec<Vec<Arc<Node>>> {
        self.index
            .read()
            .nodes
            .values()
            .map(|r| r.nodes.clone())
            .collect()
    }

    /// The chat, embeddings and speech pools with the nodes canaries visit: every
    /// healthy node, quarantined or not (so it can re-qualify), by pool,
    /// sorted by (service, model).
    /// Scraping pools too when `scrape`.
    pub(crate) fn canary_pools(&self, scrape: bool) -> Vec<(Service, String, Vec<ProvisionId>)> {
        let ix = self.index.read();
        let mut by_pool: std::collections::BTreeMap<(Service, &str), Vec<ProvisionId>> =
            Default::default();
        for (id, rec) in ix.nodes.iter().filter(|(_, r)| r.healthy) {
            for n in &rec.nodes {
                let checked = match n.entry.service {
                    Service::Chat | Service::Embeddings | Service::Tts => true,
                    Service::Scrape => scrape,
                    Service::Vision => false,
                };
                if checked {
                    let pool = by_pool.entry((n.entry.service, n.entry.model.as_str()));
                    pool.or_default().push(id.clone());
                }
            }
        }
        (by_pool.into_iter())
            .map(|((s, m), mut ids)| {
                ids.sort();
                (s, m.to_owned(), ids)
            })
            .collect()
    }

    /// How many nodes the index holds, routable or not.
    pub(crate) fn node_count(&self) -> usize {
        self.index.read().nodes.len()
    }

    /// A node's entries, routable or not.
    pub(crate) fn entries_of(&self, id: &ProvisionId) -> Vec<PoolEntry> {
        self.index
            .read()
            .nodes
            .get(id)
            .map(|r| r.nodes.iter().map(|n| n.entry.clone()).collect())
            .unwrap_or_default()
    }

    #[cfg(any(test, feature = "testkit"))]
    /// One routable-or-not node of a provision (its first entry), with its stats:
    /// what a health probe needs (endpoint, secret).
    pub(crate) fn any_node(&self, id: &ProvisionId) -> Option<Arc<Node>> {
        self.index
            .read()
            .nodes
            .get(id)
            .and_then(|r| r.nodes.first().cloned())
    }
}

/// One routable node for each of `entries`: candidates for selectors' unit tests.
#[cfg(test)]
pub(crate) fn nodes_for_tests(entries: Vec<PoolEntry>) -> Vec<Arc<Node>> {
    entries
        .into_iter()
        .map(|e| Arc::new(Node::new(e, Arc::default())))
        .collect()
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
    fn a_nodes_call_url_keeps_its_endpoints_path() {
        let mut e = entry("a", Service::Chat, "m", "");
        let route = Route::ChatCompletions;
        let n = Node::new(e.clone(), Arc::default());
        let (uri, auth) = n.request_target(route).unwrap();
        assert_eq!(uri.to_string(), "http://a.example/v1/chat/completions");
        assert_eq!(auth, "Bearer s");
        assert!(auth.is_sensitive());
        e.endpoint = "http://a.example:8080/ollama".into();
        let n = Node::new(e.clone(), Arc::default());
        let (uri, _) = n.request_target(route).unwrap();
        assert_eq!(
            uri.to_string(),
            "http://a.example:8080/ollama/v1/chat/completions"
        );
        // Every route has its own, at the index the lookup uses.
        for r in Route::ALL {
            assert_eq!(Route::ALL[r as usize], r);
            let (uri, _) = n.request_target(r).unwrap();
            assert_eq!(uri.path(), format!("/ollama{}", r.path()));
        }
        e.endpoint = "not a url".into();
        assert!(Node::new(e.clone(), Arc::default())
            .request_target(route)
            .is_none());
        // A secret that cannot be a header value makes no request either.
        e.endpoint = "http://a.example".into();
        e.node_secret = "bad\nsecret".into();
        assert!(Node::new(e, Arc::default()).request_target(route).is_none());
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
    fn quarantine_and_health_are_separate_marks_and_a_pin_reaches_past_quarantine() {
        let ix = PoolIndex::new();
        let (a, b) = (ProvisionId::new("a"), ProvisionId::new("b"));
        ix.upsert(&a, vec![entry("a", Service::Chat, "m", "")]);
        ix.upsert(&b, vec![entry("b", Service::Chat, "m", "")]);
        let rr = RoundRobinSelector;
        let pin = RoutePreferences::pinned(a.clone());
        let pinned = || ix.select_with(Service::Chat, "m", &rr, &[], &pin);
        ix.set_quarantined(&a, true);
        assert!(!ix.is_healthy(&a));
        assert_eq!(ix.pool_size(Service::Chat, "m"), 1);
        ix.set_healthy(&a, false);
        ix.set_healthy(&a, true);
        assert!(!ix.is_healthy(&a), "a probe does not end a quarantine");
        assert_eq!(
            pinned().unwrap().entry.provision_id,
            a,
            "canaries still reach it"
        );
        assert!(ix
            .select_with(Service::Chat, "m", &rr, std::slice::from_ref(&a), &pin)
            .is_none());
        ix.set_healthy(&a, false);
        assert!(pinned().is_none(), "nor a node out for its health");
        ix.set_healthy(&a, true);
        // Leaving and joining again keeps the quarantine.
        ix.remove(&a);
        ix.upsert(&a, vec![entry("a", Service::Chat, "m", "")]);
        assert!(ix.is_quarantined(&a) && !ix.is_healthy(&a));
        ix.set_quarantined(&a, false);
        assert!(ix.is_healthy(&a));
        assert_eq!(ix.pool_size(Service::Chat, "m"), 2);
        ix.set_healthy(&a, false);
        ix.set_quarantined(&a, true);
        ix.set_quarantined(&a, false);
        assert!(
            !ix.is_healthy(&a),
            "ending a quarantine does not end a health verdict"
        );
        assert_eq!(ix.pool_size(Service::Chat, "m"), 1);
    }

    #[test]
    fn an_upsert_does_work_in_proportion_to_its_entries_under_the_write_lock() {
        let ix = PoolIndex::new();
        let a = ProvisionId::new("a");
        let n = 2_000;
        let entries = |from: usize| -> Vec<PoolEntry> {
            (from..from + n)
                .map(|i| entry("a", Service::Chat, &format!("m{i}"), "DE"))
                .collect()
        };
        let steps = |f: &dyn Fn()| {
            LOCKED_STEPS.with(|c| c.set(0));
            f();
            LOCKED_STEPS.with(std::cell::Cell::get)
        };
        // Joining, changing half the entries, and every entry sent twice.
        let join = steps(&|| ix.upsert(&a, entries(0)));
        let change = steps(&|| ix.upsert(&a, entries(n / 2)));
        let twice = steps(&|| ix.upsert(&a, [entries(0), entries(0)].concat()));
        for s in [join, change, twice] {
            assert!(s <= 4 * n, "{s} steps under the lock for {n} entries");
        }
        assert_eq!(ix.entries_of(&a).len(), n);
    }

    #[test]
    fn a_listing_names_the_chosen_pools_first_then_the_largest() {
        let ix = PoolIndex::new();
        for (id, models) in [
            ("a", &["big", "mid", "small"][..]),
            ("b", &["big", "mid", "cat"][..]),
            ("c", &["big"][..]),
        ] {
            let es = models
                .iter()
                .map(|m| entry(id, Service::Chat, m, ""))
                .collect();
            ix.upsert(&ProvisionId::new(id), es);
        }
        let cat = |_: Service, m: &str| m == "cat";
        let l = ix.listed(2, cat);
        assert_eq!(
            l.pools,
            vec![
                (Service::Chat, "big".into(), 3),
                (Service::Chat, "cat".into(), 1)
            ]
        );
        assert_eq!((l.total, l.omitted()), (4, 2));
        assert_eq!(ix.listed(3, cat).pools[2].1, "mid");
        assert_eq!(ix.listed(9, cat).pools.len(), 4);
        assert!(ix.listed(0, cat).pools.is_empty());
        assert_eq!(ix.pool_size(Service::Chat, "mid"), 2);
        assert_eq!(ix.pool_size(Service::Chat, "none"), 0);
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
        ix.any_node(&a).unwrap().observe(5_000, true);
        ix.set_healthy(&a, false);
        ix.rebuild(vec![entry("a", Service::Chat, "m", "")]);
        assert_eq!(ix.node_ids(), vec![a.clone()]);
        assert!(!ix.is_healthy(&a));
        assert_eq!(ix.stats(&a).unwrap().requests(), 1);
    }

    #[test]
    fn peak_ewma_jumps_up_at_once_and_failures_look_slow() {
        let ix = PoolIndex::new();
        let a = ProvisionId::new("a");
        ix.upsert(&a, vec![entry("a", Service::Chat, "m", "")]);
        let s = ix.any_node(&a).unwrap();
        let l = s.load();
        assert_eq!(l.load_score(), 0, "a new idle node is tried first");
        let g = s.start();
        assert_eq!(
            l.load_score(),
            UNMEASURED_PENALTY_US,
            "but one request at a time"
        );
        drop(g);
        s.observe(100, true);
        assert_eq!(l.ewma_us(), 100);
        s.observe(5_000, true);
        assert_eq!(l.ewma_us(), 5_000, "a slower sample replaces the estimate");
        s.observe(100, true);
        assert!(
            l.ewma_us() > 4_000,
            "one fast answer does not hide a slow node"
        );
        s.observe(10, false);
        assert!(l.ewma_us() >= FAILURE_PENALTY_US);
        assert_eq!((s.stats.requests(), s.stats.failures()), (4, 1));
        assert_eq!(
            ix.latency_ewma_us(&a),
            l.ewma_us(),
            "one entry: the same estimate"
        );
    }

    #[test]
    fn load_is_per_entry_and_totals_are_per_provision() {
        let ix = PoolIndex::new();
        let a = ProvisionId::new("a");
        let chat = entry("a", Service::Chat, "m", "");
        let emb = entry("a", Service::Embeddings, "e", "");
        ix.upsert(&a, vec![chat.clone(), emb.clone()]);
        let rr = RoundRobinSelector;
        let c = ix.select(Service::Chat, "m", &rr, &[]).unwrap();
        let e = ix.select(Service::Embeddings, "e", &rr, &[]).unwrap();
        let (g1, g2, g3) = (c.start(), c.start(), e.start());
        assert_eq!((c.load().in_flight(), e.load().in_flight()), (2, 1));
        assert_eq!(ix.in_flight(&a), 3);
        c.observe(50_000, true);
        e.observe(2_000, true);
        assert_eq!((c.load().ewma_us(), e.load().ewma_us()), (50_000, 2_000));
        // Re-registering with the chat entry unchanged keeps its node and load;
        // the changed embeddings entry starts afresh.
        let mut moved = emb.clone();
        moved.endpoint = "http://elsewhere.example".into();
        ix.upsert(&a, vec![chat, moved]);
        let c2 = ix.select(Service::Chat, "m", &rr, &[]).unwrap();
        assert!(Arc::ptr_eq(&c, &c2));
        let e2 = ix.select(Service::Embeddings, "e", &rr, &[]).unwrap();
        assert_eq!((e2.load().in_flight(), e2.load().ewma_us()), (0, 0));
        assert!(
            Arc::ptr_eq(&e2.stats, &c.stats),
            "one provision, one breaker"
        );
        drop((g1, g2, g3));
        assert_eq!(ix.in_flight(&a), 0);
        assert_eq!(c.load().in_flight(), 0);
    }

    #[test]
    fn comparing_snapshots_orders_them_as_their_scores_do_now() {
        let snap = |in_flight: u32, ewma: u64, at_us: u64| LoadSnapshot {
            in_flight,
            latency: if ewma == 0 {
                0
            } else {
                pack_ewma(ewma, stamp_of(at_us))
            },
        };
        let t = 1_000_000_000;
        let cases = [
            (snap(0, 50_000, t), snap(0, 20_000, t)),
            (snap(3, 20_000, t), snap(0, 50_000, t)),
            // An old slow estimate against a fresh fast one, and the reverse.
            (snap(0, 400_000, t), snap(0, 20_000, t + 30_000_000)),
            (snap(0, 20_000, t + 30_000_000), snap(0, 400_000, t)),
            (snap(1, 90_000, t + 5_000_000), snap(0, 100_000, t)),
            (snap(0, 0, 0), snap(0, 20_000, t)),
            (snap(2, 0, 0), snap(9, 20_000, t)),
            (snap(1, 0, 0), snap(1, 0, 0)),
        ];
        for (a, b) in cases {
            for now in [t + 30_000_000, t + 31_000_000, t + 90_000_000] {
                let want = a.load_score_at(now).cmp(&b.load_score_at(now));
                // Scores that differ by less than the decay's rounding may tie.
                if a.load_score_at(now).abs_diff(b.load_score_at(now)) > 2 {
                    assert_eq!(a.cmp_load(b), want, "{a:?} vs {b:?} at {now}");
                    assert_eq!(b.cmp_load(a), want.reverse());
                }
            }
        }
    }

    #[test]
    fn integer_decay_matches_the_exponential() {
        for dt in [
            0,
            1,
            999,
            8_000,
            1_000_000,
            6_931_472,
            10_000_000,
            37_000_000,
            200_000_000,
        ] {
            for v in [1_000u64, 80_000, 1_000_000, u64::from(u32::MAX)] {
                let exact = v as f64 * (-(dt as f64) / EWMA_DECAY_US as f64).exp();
                let got = decay(v, dt) as f64;
                assert!(
                    (got - exact).abs() <= exact * 0.001 + 1.0,
                    "{v} after {dt} us: {got} vs {exact}"
                );
            }
        }
        assert_eq!(decay(u64::MAX, u64::MAX), 0);
        assert_eq!(decay(5, 0), 5);
    }

    #[test]
    fn estimates_decay_with_idle_time_and_survive_the_stamp_wrapping() {
        let l = PeakEwma::default();
        let t0 = 5 * STAMP_UNIT_US;
        l.observe(80_000, t0);
        assert_eq!(estimate_of(l.0.load(Ordering::Relaxed), t0), 80_000);
        assert_eq!(
            estimate_of(l.0.load(Ordering::Relaxed), t0 - 1_000),
            80_000,
            "a lagging clock is not idle time"
        );
        let later = estimate_of(l.0.load(Ordering::Relaxed), t0 + 10_000_000);
        assert!((29_000..=30_000).contains(&later), "1/e after τ: {later}");
        assert_eq!(
            estimate_of(l.0.load(Ordering::Relaxed), t0 + 1_000_000_000),
            1,
            "long idle: nearly 0"
        );
        // Across the 32-bit wrap of the stamp, differences stay right.
        let near_wrap = (u64::from(u32::MAX) - 1) * STAMP_UNIT_US;
        let w = PeakEwma::default();
        w.observe(80_000, near_wrap);
        let after = estimate_of(w.0.load(Ordering::Relaxed), near_wrap + 10_000_000);
        assert!((29_000..=30_000).contains(&after), "{after}");
        assert_eq!(idle_us(stamp_of(near_wrap), near_wrap + 16_000), 16_000);
    }
}
