//! Keeping the pools true: a passive circuit breaker fed by the request path,
//! and an active monitor that probes nodes in the background.
//!
//! Both only ever change the in-memory routing index (a node's health
//! mark); neither adds anything to a request's path
//! but a few atomic updates after each attempt. Time comes from the broker's
//! [`Clock`], so tests drive every transition with a manual clock.
//!
//! ## The breaker, per node
//!
//! ```text
//!            failure rate ≥ threshold over the window (≥ min samples),
//!            probe failures in a row ≥ limit,
//!            or a 429/503 with Retry-After
//!   Closed ──────────────────────────────────────────────▶ Open (out of routing)
//!     ▲                                                      │ cooldown over and
//!     │ `half_open_successes` forwarded successes            │ a probe succeeds
//!     │                                                      ▼
//!     └───────────────────────────────────────────────── HalfOpen (in routing,
//!                        any failure: Open again,              on trial)
//!                        with a doubled cooldown
//! ```
//!
//! * The failure window is a ring of time buckets of atomics: recording is
//!   lock-free; a short per-node lock is taken only for a state change.
//! * Cooldowns only extend: a later, shorter cooldown (or Retry-After) never
//!   brings a node back sooner than one already set. Each reopening without
//!   a full recovery doubles the cooldown, up to `max_cooldown`.
//! * A node's own `Retry-After` (on 429 or 503, in seconds or as an HTTP
//!   date) takes it out for that long at once, capped at `max_retry_after`;
//!   it does not count toward the doubling, since the node asked politely.
//! * A half-open node is routable again but on trial: its first failure
//!   opens it again. Only traffic closes it; probes alone only say it is up.
//!
//! ## The monitor
//!
//! [`Broker::run_health_checks`] probes `GET {endpoint}/heartbeat` with the node
//! secret as bearer, at most `max_concurrent_probes` at a time, each within
//! `probe_timeout`: closed and half-open nodes every round, open nodes only
//! once their cooldown is over (the half-open probe).
//!
//! ## Bounds
//!
//! | a node that... | leaves routing | returns |
//! |---|---|---|
//! | stops heartbeating | after `heartbeat_ttl`, at the next maintenance round (the store ends it) | when it reports ready again |
//! | fails probes | after `probe_failures_to_eject` rounds in a row | at the first probe after its cooldown that succeeds, on trial |
//! | fails while forwarding | on the failure that makes `failure_rate_permille` of at least `min_samples` attempts within `window` | likewise |
//! | answers 429/503 with Retry-After | at once | likewise, after the Retry-After |

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::pool::{Node, PoolIndex};
use crate::types::{ProvisionId, Timestamp};
#[cfg(doc)]
use crate::Broker;

/// Settings of the breaker and the monitor.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthConfig {
    /// How often the background monitor probes (see `Broker::spawn_maintenance`).
    pub probe_interval: Duration,
    /// How long one probe may take.
    pub probe_timeout: Duration,
    /// Probes in flight at once.
    pub max_concurrent_probes: usize,
    /// Failed probes in a row that take a node out.
    pub probe_failures_to_eject: u32,
    /// The span over which forwarding failures are counted.
    pub window: Duration,
    /// Attempts within the window before the failure rate is judged.
    pub min_samples: u32,
    /// The failure rate (per mille of attempts) that takes a node out.
    pub failure_rate_permille: u32,
    /// The first cooldown; each reopening without recovery doubles it.
    pub cooldown: Duration,
    /// The longest cooldown.
    pub max_cooldown: Duration,
    /// Forwarded successes that close a half-open node (0: the probe alone closes it).
    pub half_open_successes: u32,
    /// The longest Retry-After honoured.
    pub max_retry_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_interval: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(3),
            max_concurrent_probes: 32,
            probe_failures_to_eject: 2,
            window: Duration::from_secs(60),
            min_samples: 5,
            failure_rate_permille: 500,
            cooldown: Duration::from_secs(15),
            max_cooldown: Duration::from_secs(300),
            half_open_successes: 3,
            max_retry_after: Duration::from_secs(600),
        }
    }
}

/// Where a node's breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Routable; failures are being counted.
    Closed,
    /// Out of routing until its cooldown is over and a probe succeeds.
    Open,
    /// Routable again on trial: one failure opens it, enough successes close it.
    HalfOpen,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// The state's position in [`BreakerState::ALL`] (and as stored).
    pub(crate) fn as_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    /// Every state, in the order of their stored values: closed, open, half-open.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    /// The state's name in metrics and statistics: `closed`, `open`, `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What one forwarded attempt or probe came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It worked.
    Success,
    /// It failed (status, garbage, refused connection).
    Failure,
    /// It timed out: the node hung for many times what its pool usually
    /// takes. Forwarding takes such a node out of routing at once (one hung
    /// call is enough: waiting for a failure rate would hang more callers);
    /// for a probe it is a failure like any other.
    Timeout,
    /// The node said it is busy (429 or 503) and when to come back.
    Busy(Duration),
}

/// A change a recorded outcome made to a node's routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Taken out of routing until the given time at least.
    Opened(Timestamp),
    /// Back in routing on trial.
    HalfOpened,
    /// Fully recovered.
    Closed,
}

/// Buckets of the failure window; each covers `window / WINDOW_BUCKETS`.
const WINDOW_BUCKETS: usize = 10;

/// A bucket: the bucket's epoch (32 bits, wrapping) | failures (16) | attempts (16).
fn pack(epoch: u32, failures: u16, total: u16) -> u64 {
    (u64::from(epoch) << 32) | (u64::from(failures) << 16) | u64::from(total)
}

fn unpack(v: u64) -> (u32, u16, u16) {
    ((v >> 32) as u32, (v >> 16) as u16, v as u16)
}

/// The breaker and probe state of one node (inside its
/// [`NodeStats`](crate::pool::NodeStats)). All atomics; the lock is taken
/// only to change state, so state changes and routing changes happen in the
/// same order.
#[derive(Debug, Default)]
pub(crate) struct NodeHealth {
    window: [AtomicU64; WINDOW_BUCKETS],
    state: AtomicU8,
    open_until: AtomicI64,
    trips: AtomicU32,
    half_open_ok: AtomicU32,
    probe_failures: AtomicU32,
    transition: Mutex<()>,
}

impl NodeHealth {
    /// The breaker's state.
    pub(crate) fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The earliest time an open node may return (meaningless when closed).
    pub(crate) fn open_until(&self) -> Timestamp {
        Timestamp(self.open_until.load(Ordering::Acquire))
    }

    /// (failures, attempts) within the window ending at `now`.
    pub(crate) fn window_counts(&self, cfg: &HealthConfig, now: Timestamp) -> (u32, u32) {
        let cur = epoch(cfg, now);
        self.window
            .iter()
            .map(|b| unpack(b.load(Ordering::Relaxed)))
            .filter(|(e, _, _)| (cur.wrapping_sub(*e) as usize) < WINDOW_BUCKETS)
            .fold((0, 0), |(f, t), (_, bf, bt)| {
                (f + u32::from(bf), t + u32::from(bt))
            })
    }

    fn window_add(&self, cfg: &HealthConfig, now: Timestamp, failed: bool) {
        let e = epoch(cfg, now);
        let slot = &self.window[e as usize % WINDOW_BUCKETS];
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            let (be, f, t) = unpack(v);
            Some(if be == e && t > 0 {
                pack(e, f.saturating_add(u16::from(failed)), t.saturating_add(1))
            } else {
                pack(e, u16::from(failed), 1)
            })
        });
    }

    fn window_clear(&self) {
        for b in &self.window {
            b.store(0, Ordering::Relaxed);
        }
    }

    fn set_state(&self, s: BreakerState) {
        self.state.store(s.as_u8(), Ordering::Release);
    }
}

fn epoch(cfg: &HealthConfig, now: Timestamp) -> u32 {
    let width = (cfg.window.as_millis() as i64 / WINDOW_BUCKETS as i64).max(1);
    // Wrapping on purpose: only differences between nearby epochs matter.
    now.millis().div_euclid(width) as u32
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Applies a state change to a node under its transition lock, and the
/// matching routing change, unless the node has left (or rejoined afresh)
/// since `node` was taken from the index.
fn transition(
    pools: &PoolIndex,
    node: &Node,
    f: impl FnOnce(&NodeHealth) -> Option<Transition>,
) -> Option<Transition> {
    let h = node.stats.health();
    let _g = h.transition.lock();
    let current = pools
        .stats(&node.entry.provision_id)
        .is_some_and(|s| Arc::ptr_eq(&s, &node.stats));
    if !current {
        return None;
    }
    let t = f(h)?;
    pools.set_healthy(
        &node.entry.provision_id,
        !matches!(t, Transition::Opened(_)),
    );
    Some(t)
}

/// Counts one more trip and keeps the node out for the next cooldown of the
/// doubling sequence (never bringing it back sooner than already set).
fn extend_cooldown(cfg: &HealthConfig, h: &NodeHealth, now: Timestamp) {
    let trips = h.trips.fetch_add(1, Ordering::Relaxed).min(20);
    let cooldown = ms(cfg.cooldown)
        .saturating_mul(1i64 << trips)
        .min(ms(cfg.max_cooldown));
    h.open_until
        .fetch_max(now.millis().saturating_add(cooldown), Ordering::AcqRel);
}

/// Opens the breaker with the next cooldown of the doubling sequence.
fn trip(cfg: &HealthConfig, pools: &PoolIndex, node: &Node, now: Timestamp) -> Option<Transition> {
    transition(pools, node, |h| {
        if h.state() == BreakerState::Open {
            return None;
        }
        extend_cooldown(cfg, h, now);
        open(h);
        Some(Transition::Opened(h.open_until()))
    })
}

/// Keeps a node out for `d` (a node's Retry-After), extending any cooldown.
fn hold(
    cfg: &HealthConfig,
    pools: &PoolIndex,
    node: &Node,
    now: Timestamp,
    d: Duration,
) -> Option<Transition> {
    let d = d.min(cfg.max_retry_after);
    transition(pools, node, |h| {
        let was_open = h.state() == BreakerState::Open;
        h.open_until
            .fetch_max(now.millis().saturating_add(ms(d)), Ordering::AcqRel);
        if was_open {
            return None;
        }
        open(h);
        Some(Transition::Opened(h.open_until()))
    })
}

fn open(h: &NodeHealth) {
    h.set_state(BreakerState::Open);
    h.window_clear();
    h.half_open_ok.store(0, Ordering::Relaxed);
    h.probe_failures.store(0, Ordering::Relaxed);
}

/// After a successful probe past the cooldown: back in routing, on trial.
fn half_open(
    cfg: &HealthConfig,
    pools: &PoolIndex,
    node: &Node,
    now: Timestamp,
) -> Option<Transition> {
    transition(pools, node, |h| {
        if h.state() != BreakerState::Open || now < h.open_until() {
            return None;
        }
        h.window_clear();
        h.half_open_ok.store(0, Ordering::Relaxed);
        if cfg.half_open_successes == 0 {
            h.trips.store(0, Ordering::Relaxed);
            h.set_state(BreakerState::Closed);
            return Some(Transition::Closed);
        }
        h.set_state(BreakerState::HalfOpen);
        Some(Transition::HalfOpened)
    })
}

fn close(pools: &PoolIndex, node: &Node) -> Option<Transition> {
    transition(pools, node, |h| {
        if h.state() != BreakerState::HalfOpen {
            return None;
        }
        h.set_state(BreakerState::Closed);
        h.trips.store(0, Ordering::Relaxed);
        h.window_clear();
        Some(Transition::Closed)
    })
}

/// Records the outcome of one forwarded attempt on `node` (the passive
/// breaker). Lock-free unless the node's state changes.
pub(crate) fn record_forwarding(
    cfg: &HealthConfig,
    pools: &PoolIndex,
    node: &Node,
    now: Timestamp,
    outcome: Outcome,
) -> Option<Transition> {
    let h = node.stats.health();
    match outcome {
        Outcome::Success => {
            h.window_add(cfg, now, false);
            if h.state() == BreakerState::HalfOpen {
                let ok = h.half_open_ok.fetch_add(1, Ordering::Relaxed) + 1;
                if ok >= cfg.half_open_successes {
                    return close(pools, node);
                }
            }
            None
        }
        Outcome::Failure => {
            h.window_add(cfg, now, true);
            match h.state() {
                BreakerState::Closed => {
                    let (f, t) = h.window_counts(cfg, now);
                    let over = t >= cfg.min_samples.max(1)
                        && u64::from(f) * 1_000
                            >= u64::from(cfg.failure_rate_permille) * u64::from(t);
                    if over {
                        trip(cfg, pools, node, now)
                    } else {
                        None
                    }
                }
                BreakerState::HalfOpen => trip(cfg, pools, node, now),
                // Requests that were in flight when it opened: nothing more to do.
                BreakerState::Open => None,
            }
        }
        Outcome::Busy(d) => {
            h.window_add(cfg, now, true);
            hold(cfg, pools, node, now, d)
        }
        Outcome::Timeout => {
            h.window_add(cfg, now, true);
            trip(cfg, pools, node, now)
        }
    }
}

/// Records the outcome of one probe of `node` (the active monitor).
pub(crate) fn record_probe(
    cfg: &HealthConfig,
    pools: &PoolIndex,
    node: &Node,
    now: Timestamp,
    outcome: Outcome,
) -> Option<Transition> {
    let h = node.stats.health();
    match (outcome, h.state()) {
        (Outcome::Busy(d), _) => hold(cfg, pools, node, now, d),
        (Outcome::Success, BreakerState::Open) => half_open(cfg, pools, node, now),
        (Outcome::Success, _) => {
            h.probe_failures.store(0, Ordering::Relaxed);
            None
        }
        (Outcome::Failure | Outcome::Timeout, BreakerState::Closed) => {
            let n = h.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= cfg.probe_failures_to_eject.max(1) {
                trip(cfg, pools, node, now)
            } else {
                None
            }
        }
        (Outcome::Failure | Outcome::Timeout, BreakerState::HalfOpen) => {
            trip(cfg, pools, node, now)
        }
        (Outcome::Failure | Outcome::Timeout, BreakerState::Open) => {
            // The half-open probe failed: stay out, for longer.
            if now >= h.open_until() {
                transition(pools, node, |h| {
                    extend_cooldown(cfg, h, now);
                    Some(Transition::Opened(h.open_until()))
                })
            } else {
                None
            }
        }
    }
}

/// What one round of health checks did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// Nodes probed.
    pub probed: usize,
    /// Probes that failed (or said busy).
    pub failed: usize,
    /// Nodes taken out of routing by this round.
    pub ejected: Vec<ProvisionId>,
    /// Nodes put back into routing (on trial, or fully) by this round.
    pub restored: Vec<ProvisionId>,
}

/// Classifies a node's HTTP answer: 2xx is a success; 429 or 503 with a
/// Retry-After is [`Outcome::Busy`]; anything else a failure.
pub(crate) fn classify(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    now: Timestamp,
) -> Outcome {
    if status.is_success() {
        return Outcome::Success;
    }
    if matches!(status.as_u16(), 429 | 503) {
        if let Some(d) = retry_after(headers, now) {
            return Outcome::Busy(d);
        }
    }
    Outcome::Failure
}

pub use cxmpute_api::retry_after;

/// Probes one node: `GET {endpoint}/heartbeat` with its secret as bearer.
async fn probe(
    client: &reqwest::Client,
    node: &Node,
    timeout: Duration,
    clock: &dyn Clock,
) -> Outcome {
    let url = format!("{}/heartbeat", node.entry.endpoint);
    let sent = client
        .get(url)
        .bearer_auth(&node.entry.node_secret)
        .timeout(timeout)
        .send()
        .await;
    match sent {
        Ok(resp) => classify(resp.status(), resp.headers(), clock.now()),
        Err(_) => Outcome::Failure,
    }
}

/// One round of the active monitor: probes every node that is due (see the
/// [module docs](self)) with bounded concurrency and applies the verdicts.
///
/// A node taken out of routing by hand ([`PoolIndex::set_healthy`]) with a
/// closed breaker stays out: probes only move nodes the breaker moved.
pub(crate) async fn run_health_checks(
    cfg: &HealthConfig,
    pools: &PoolIndex,
    client: &reqwest::Client,
    clock: &dyn Clock,
) -> HealthReport {
    let now = clock.now();
    // One node per provision (the breaker is the provision's).
    let due: Vec<Arc<Node>> = pools
        .provisions()
        .into_iter()
        .filter_map(|nodes| nodes.into_iter().next())
        .filter(|node| {
            let h = node.stats.health();
            h.state() != BreakerState::Open || now >= h.open_until()
        })
        .collect();
    let mut report = HealthReport {
        probed: due.len(),
        ..HealthReport::default()
    };
    let concurrency = cfg.max_concurrent_probes.max(1);
    let results: Vec<(Arc<Node>, Outcome)> = futures::stream::iter(due)
        .map(|node| async move {
            let o = probe(client, &node, cfg.probe_timeout, clock).await;
            (node, o)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    // Verdicts are applied at the time the round ends.
    let now = clock.now();
    for (node, outcome) in results {
        if outcome != Outcome::Success {
            report.failed += 1;
        }
        let id = node.entry.provision_id.clone();
        match record_probe(cfg, pools, &node, now, outcome) {
            Some(Transition::Opened(until)) => {
                tracing::warn!(provision = %id, until = until.millis(), "node out of routing: failed health probes");
                report.ejected.push(id);
            }
            Some(Transition::HalfOpened | Transition::Closed) => {
                tracing::info!(provision = %id, "node back in routing after a successful probe");
                report.restored.push(id);
            }
            None => {}
        }
    }
    report.ejected.sort();
    report.restored.sort();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PoolEntry, ProviderId, Service};

    fn cfg() -> HealthConfig {
        HealthConfig {
            min_samples: 4,
            failure_rate_permille: 500,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(35),
            half_open_successes: 2,
            ..HealthConfig::default()
        }
    }

    fn setup() -> (PoolIndex, Arc<Node>) {
        let ix = PoolIndex::new();
        let id = ProvisionId::new("n");
        ix.upsert(
            &id,
            vec![PoolEntry {
                provision_id: id.clone(),
                provider_id: ProviderId::new("p"),
                service: Service::Chat,
                model: "m".into(),
                endpoint: "http://n".into(),
                node_secret: "s".into(),
                tier: 1,
                region: String::new(),
            }],
        );
        let node = ix.any_node(&id).unwrap();
        (ix, node)
    }

    #[test]
    fn trips_only_with_the_minimum_sample_and_the_rate() {
        let (ix, n) = setup();
        let c = cfg();
        let t = Timestamp(1_000_000);
        let id = &n.entry.provision_id;
        assert_eq!(record_forwarding(&c, &ix, &n, t, Outcome::Failure), None);
        assert_eq!(record_forwarding(&c, &ix, &n, t, Outcome::Success), None);
        assert_eq!(record_forwarding(&c, &ix, &n, t, Outcome::Success), None);
        assert!(ix.is_healthy(id));
        // 2 of 4: at the rate, with the minimum sample.
        let tr = record_forwarding(&c, &ix, &n, t, Outcome::Failure);
        assert_eq!(tr, Some(Transition::Opened(Timestamp(1_010_000))));
        assert!(!ix.is_healthy(id));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let (ix, n) = setup();
        let c = cfg();
        for _ in 0..3 {
            record_forwarding(&c, &ix, &n, Timestamp(0), Outcome::Failure);
        }
        let later = Timestamp(61_000);
        assert_eq!(n.stats.health().window_counts(&c, later), (0, 0));
        assert_eq!(
            record_forwarding(&c, &ix, &n, later, Outcome::Failure),
            None
        );
        assert!(ix.is_healthy(&n.entry.provision_id));
    }

    #[test]
    fn cooldowns_double_cap_and_only_extend() {
        let (ix, n) = setup();
        let c = cfg();
        let id = n.entry.provision_id.clone();
        let mut now = Timestamp(0);
        for _ in 0..4 {
            record_forwarding(&c, &ix, &n, now, Outcome::Failure);
        }
        assert_eq!(n.stats.health().open_until(), Timestamp(10_000));
        // A probe before the cooldown changes nothing.
        assert_eq!(
            record_probe(&c, &ix, &n, Timestamp(9_999), Outcome::Success),
            None
        );
        // A shorter Retry-After does not shorten it.
        record_forwarding(&c, &ix, &n, now, Outcome::Busy(Duration::from_secs(1)));
        assert_eq!(n.stats.health().open_until(), Timestamp(10_000));
        now = Timestamp(10_000);
        assert_eq!(
            record_probe(&c, &ix, &n, now, Outcome::Success),
            Some(Transition::HalfOpened)
        );
        assert!(ix.is_healthy(&id));
        // On trial: one failure reopens it, for twice as long.
        assert_eq!(
            record_forwarding(&c, &ix, &n, now, Outcome::Failure),
            Some(Transition::Opened(Timestamp(30_000)))
        );
        now = Timestamp(30_000);
        // A failed half-open probe keeps it out, for longer still (capped at 35 s).
        assert_eq!(
            record_probe(&c, &ix, &n, now, Outcome::Failure),
            Some(Transition::Opened(Timestamp(65_000)))
        );
        now = Timestamp(65_000);
        record_probe(&c, &ix, &n, now, Outcome::Success);
        record_forwarding(&c, &ix, &n, now, Outcome::Success);
        assert_eq!(n.stats.health().state(), BreakerState::HalfOpen);
        assert_eq!(
            record_forwarding(&c, &ix, &n, now, Outcome::Success),
            Some(Transition::Closed)
        );
        // Fully recovered: the next trip starts from the first cooldown again.
        for _ in 0..4 {
            record_forwarding(&c, &ix, &n, now, Outcome::Failure);
        }
        assert_eq!(n.stats.health().open_until(), Timestamp(75_000));
    }

    #[test]
    fn retry_after_takes_a_node_out_at_once_and_is_capped() {
        let (ix, n) = setup();
        let c = cfg();
        let tr = record_forwarding(
            &c,
            &ix,
            &n,
            Timestamp(0),
            Outcome::Busy(Duration::from_secs(3)),
        );
        assert_eq!(tr, Some(Transition::Opened(Timestamp(3_000))));
        record_forwarding(
            &c,
            &ix,
            &n,
            Timestamp(0),
            Outcome::Busy(Duration::from_secs(86_400)),
        );
        assert_eq!(n.stats.health().open_until(), Timestamp(600_000));
    }

    #[test]
    fn probe_failures_in_a_row_eject() {
        let (ix, n) = setup();
        let c = cfg();
        assert_eq!(
            record_probe(&c, &ix, &n, Timestamp(0), Outcome::Failure),
            None
        );
        assert_eq!(
            record_probe(&c, &ix, &n, Timestamp(0), Outcome::Success),
            None
        );
        assert_eq!(
            record_probe(&c, &ix, &n, Timestamp(0), Outcome::Failure),
            None
        );
        assert!(matches!(
            record_probe(&c, &ix, &n, Timestamp(0), Outcome::Failure),
            Some(Transition::Opened(_))
        ));
    }

    #[test]
    fn a_verdict_on_a_departed_node_is_dropped() {
        let (ix, n) = setup();
        let c = cfg();
        let id = n.entry.provision_id.clone();
        let entries = ix.entries_of(&id);
        ix.remove(&id);
        ix.upsert(&id, entries);
        let tr = record_forwarding(
            &c,
            &ix,
            &n,
            Timestamp(0),
            Outcome::Busy(Duration::from_secs(9)),
        );
        assert_eq!(tr, None);
        assert!(ix.is_healthy(&id));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = http::HeaderMap::new();
        let now = Timestamp(784_111_777_000 - 5_000); // 5 s before the date below
        assert_eq!(retry_after(&h, now), None);
        h.insert(http::header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        h.insert(
            http::header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(5)));
        assert_eq!(
            retry_after(&h, Timestamp(i64::MAX / 2)),
            Some(Duration::ZERO)
        );
        h.insert(http::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
        let busy = classify(http::StatusCode::SERVICE_UNAVAILABLE, &h, now);
        assert_eq!(
            busy,
            Outcome::Failure,
            "no readable Retry-After: a plain failure"
        );
    }
}
