//! Prometheus metrics of one broker, served at `GET /metrics`.
//!
//! Each [`Broker`] owns its own recorder (built with
//! `PrometheusBuilder::build_recorder`, never installed globally) and emits
//! into it through `metrics::with_local_recorder`. So several brokers in one
//! process (tests, a host serving two markets) never mix their numbers, and
//! embedding the broker never fights the host over the process-wide
//! recorder.
//!
//! Counters and histograms are emitted at the pipeline's points; gauges that
//! describe the present (pool sizes, circuit breakers, unsent stats batches)
//! are set from the live state when the page is rendered, so they are never
//! stale.
//!
//! Pool sizes are written onto the page directly rather than through the
//! recorder: a recorder keeps every series it was ever given, and pools come
//! and go with strangers' nodes, so a pool with no node left must vanish from
//! the page, not linger at 0. The page names the pools of
//! [`Broker::listed_pools`] (at most `BrokerConfig::public_list_limit`, the
//! catalogue's first) and counts them all in `cxmpute_pools`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `cxmpute_http_requests_total` | counter | `route`, `status` |
//! | `cxmpute_time_to_first_byte_seconds` | histogram | `route` |
//! | `cxmpute_requests_total` | counter | `route`, `outcome` (`success`/`failure`) |
//! | `cxmpute_request_duration_seconds` | histogram | `route`, `outcome` |
//! | `cxmpute_tokens_total` | counter | `route`, `kind` (`input`/`output`) |
//! | `cxmpute_units_total` | counter | `route` |
//! | `cxmpute_charged_microcredits_total` | counter | `route` |
//! | `cxmpute_rewarded_microcredits_total` | counter | `route` |
//! | `cxmpute_upstream_attempts_total` | counter | `service`, `outcome` (`success`/`failure`/`timeout`/`busy`/`refused`) |
//! | `cxmpute_failovers_total` | counter | `route` |
//! | `cxmpute_hedges_total` | counter | `route` |
//! | `cxmpute_fallbacks_total` | counter | `route` |
//! | `cxmpute_circuit_breaker_transitions_total` | counter | `to` (`open`/`half_open`/`closed`) |
//! | `cxmpute_circuit_breakers` | gauge | `state` |
//! | `cxmpute_pool_nodes` | gauge | `service`, `model` (listed pools only) |
//! | `cxmpute_pools` | gauge | |
//! | `cxmpute_nodes` | gauge | |
//! | `cxmpute_stats_flush_failures_total` | counter | |
//! | `cxmpute_stats_unsent_batches` | gauge | |
//! | `cxmpute_cache_hits_total`, `cxmpute_cache_misses_total` | counter | |
//! | `cxmpute_cache_evictions_total` | counter | |
//! | `cxmpute_cache_bytes`, `cxmpute_cache_entries` | gauge | |
//!
//! Labels never carry a user, key or provider: what is per account lives in
//! the usage statistics, behind authentication.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Histogram, Unit};
use metrics_exporter_prometheus::formatting::{
    sanitize_label_value, write_help_line, write_type_line,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use parking_lot::RwLock;

use crate::broker::Broker;
use crate::health::BreakerState;
use crate::pool::service_slot;
use crate::types::*;

/// Histogram buckets (seconds) for latencies: 5 ms to 2 minutes.
pub(crate) const SECONDS_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// The metrics of one broker. See the [module docs](self).
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The series each request touches, by route (indexed by `Route as usize`).
    routes: [RouteSeries; Route::ALL.len()],
    /// `cxmpute_upstream_attempts_total` by service slot and outcome.
    attempts: [[OnceLock<Counter>; AttemptOutcome::COUNT]; Service::ALL.len()],
}

/// The series of one route. Each handle is registered on first use (so a
/// series still appears with its first value, as with the macros) and then
/// kept: the request path builds no label set and does no registry lookup.
#[derive(Default)]
struct RouteSeries {
    /// Requests and their duration, by outcome (indexed by `success`).
    settled: [OnceLock<(Counter, Histogram)>; 2],
    /// Tokens, units and money.
    totals: OnceLock<Totals>,
    failovers: OnceLock<Counter>,
    hedges: OnceLock<Counter>,
    fallbacks: OnceLock<Counter>,
    ttfb: OnceLock<Histogram>,
    /// `cxmpute_http_requests_total` by status: a handful per route.
    http: RwLock<Vec<(u16, Counter)>>,
}

/// A route's running totals of what settled requests consumed and paid.
struct Totals {
    input_tokens: Counter,
    output_tokens: Counter,
    units: Counter,
    charged: Counter,
    rewarded: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The label value of an attempt's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttemptOutcome {
    /// The node answered.
    Success,
    /// It failed (status, garbage, refused connection).
    Failure,
    /// It timed out.
    Timeout,
    /// It said it was busy (429/503).
    Busy,
    /// It refused the request (400/413/422 with a message).
    Refused,
}

impl AttemptOutcome {
    /// How many outcomes there are (`self as usize` is below it).
    const COUNT: usize = 5;

    fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::Failure => "failure",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Busy => "busy",
            AttemptOutcome::Refused => "refused",
        }
    }
}

impl Metrics {
    /// A fresh recorder with the metrics described.
    pub(crate) fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics {
            recorder,
            handle,
            routes: Default::default(),
            attempts: Default::default(),
        };
        m.with(describe);
        m
    }

    /// Runs `f` with this broker's recorder as the current one, so the
    /// `metrics` macros inside it land here.
    pub(crate) fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The handle in `cell`, registered in this broker's recorder by `register`
    /// the first time.
    fn once<'a, T>(&self, cell: &'a OnceLock<T>, register: impl FnOnce() -> T) -> &'a T {
        cell.get_or_init(|| self.with(register))
    }

    /// A gateway call answered with `status`; `ttfb` is the time until the
    /// response head (for streams: until the node's first chunk arrived).
    pub(crate) fn http_request(&self, route: Route, status: u16, ttfb: Duration) {
        let s = &self.routes[route as usize];
        let counted = (s.http.read().iter())
            .find(|(c, _)| *c == status)
            .map(|(_, h)| h.increment(1));
        if counted.is_none() {
            // The route's first answer with this status: register its series
            // (checked again under the write lock, another call may have).
            let mut by_status = s.http.write();
            match by_status.iter().find(|(c, _)| *c == status) {
                Some((_, h)) => h.increment(1),
                None => {
                    let h = self.with(|| {
                        counter!("cxmpute_http_requests_total", "route" => route.path(), "status" => status.to_string())
                    });
                    h.increment(1);
                    by_status.push((status, h));
                }
            }
        }
        if (200..300).contains(&status) {
            self.once(
                &s.ttfb,
                || histogram!("cxmpute_time_to_first_byte_seconds", "route" => route.path()),
            )
            .record(ttfb.as_secs_f64());
        }
    }

    /// A request settled (charged, rewarded, recorded).
    pub(crate) fn settled(&self, u: &UsageRecord) {
        let s = &self.routes[u.route as usize];
        let r = u.route.path();
        let (requests, duration) = self.once(&s.settled[usize::from(u.success)], || {
            let outcome = if u.success { "success" } else { "failure" };
            (
                counter!("cxmpute_requests_total", "route" => r, "outcome" => outcome),
                histogram!("cxmpute_request_duration_seconds", "route" => r, "outcome" => outcome),
            )
        });
        requests.increment(1);
        duration.record(u.latency_ms as f64 / 1000.0);
        let t = self.once(&s.totals, || Totals {
            input_tokens: counter!("cxmpute_tokens_total", "route" => r, "kind" => "input"),
            output_tokens: counter!("cxmpute_tokens_total", "route" => r, "kind" => "output"),
            units: counter!("cxmpute_units_total", "route" => r),
            charged: counter!("cxmpute_charged_microcredits_total", "route" => r),
            rewarded: counter!("cxmpute_rewarded_microcredits_total", "route" => r),
        });
        t.input_tokens.increment(u.input_tokens);
        t.output_tokens.increment(u.output_tokens);
        t.units.increment(u.units);
        t.charged.increment(u.charged.0.max(0) as u64);
        t.rewarded.increment(u.reward.0.max(0) as u64);
    }

    /// One forwarded attempt on one node ended.
    pub(crate) fn attempt(&self, service: Service, outcome: AttemptOutcome) {
        let cell = &self.attempts[service_slot(service)][outcome as usize];
        self.once(cell, || {
            counter!("cxmpute_upstream_attempts_total", "service" => service.as_str(), "outcome" => outcome.as_str())
        })
        .increment(1);
    }

    /// A request moved on to another node after a failed attempt.
    pub(crate) fn failover(&self, route: Route) {
        self.once(
            &self.routes[route as usize].failovers,
            || counter!("cxmpute_failovers_total", "route" => route.path()),
        )
        .increment(1);
    }

    /// A slow attempt was hedged: a second one started on another node.
    pub(crate) fn hedge(&self, route: Route) {
        self.once(
            &self.routes[route as usize].hedges,
            || counter!("cxmpute_hedges_total", "route" => route.path()),
        )
        .increment(1);
    }

    /// A request moved on to the next model it names (a `models` list or
    /// an alias): no node of the one before served it.
    pub(crate) fn fallback(&self, route: Route) {
        self.once(
            &self.routes[route as usize].fallbacks,
            || counter!("cxmpute_fallbacks_total", "route" => route.path()),
        )
        .increment(1);
    }

    /// A node's circuit breaker changed state.
    pub(crate) fn breaker_transition(&self, to: BreakerState) {
        self.with(|| {
            counter!("cxmpute_circuit_breaker_transitions_total", "to" => to.as_str()).increment(1);
        });
    }

    /// A canary call's verdict (`pass`, `fail`, `inconclusive`) on a node of
    /// `service` (see [`crate::verify`]).
    pub(crate) fn canary_verdict(&self, service: Service, verdict: &'static str) {
        self.with(|| {
            counter!("cxmpute_canary_verdicts_total", "service" => service.as_str(), "verdict" => verdict)
                .increment(1);
        });
    }

    /// A stats flush failed (its batch is kept and retried).
    pub(crate) fn stats_flush_failed(&self) {
        self.with(|| counter!("cxmpute_stats_flush_failures_total").increment(1));
    }

    /// Folds buffered histogram samples in; run now and then when nobody
    /// scrapes, so the buffers stay small.
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text page, with the live gauges of `broker` set first
    /// and its listed pools' sizes written after the recorder's series.
    pub fn render(&self, broker: &Broker) -> String {
        let pools = broker.listed_pools();
        let provisions = broker.pools().provisions();
        let mut breakers = [0u64; 3];
        // One index read for all nodes; a provision's entries share its breaker.
        for nodes in &provisions {
            breakers[usize::from(nodes[0].stats.health().state().as_u8())] += 1;
        }
        self.with(|| {
            for (state, n) in BreakerState::ALL.into_iter().zip(breakers) {
                gauge!("cxmpute_circuit_breakers", "state" => state.as_str()).set(n as f64);
            }
            gauge!("cxmpute_nodes").set(provisions.len() as f64);
            gauge!("cxmpute_quarantined_nodes").set(broker.pools().quarantined_count() as f64);
            gauge!("cxmpute_pools").set(pools.total as f64);
            gauge!("cxmpute_stats_unsent_batches")
                .set(broker.stats_recorder().unsent_batches() as f64);
            // The response cache keeps its own counts (its eviction listener
            // runs outside any call); they are copied in here.
            let c = broker.inner().cache.figures();
            counter!("cxmpute_cache_hits_total").absolute(c.hits);
            counter!("cxmpute_cache_misses_total").absolute(c.misses);
            counter!("cxmpute_cache_evictions_total").absolute(c.evictions);
            gauge!("cxmpute_cache_bytes").set(c.bytes as f64);
            gauge!("cxmpute_cache_entries").set(c.entries as f64);
        });
        let mut page = self.handle.render();
        write_pool_gauges(&mut page, &pools.pools);
        page
    }
}

/// Writes `cxmpute_pool_nodes` for `pools` in the text format, as the
/// recorder writes its own families (help, type, samples, a blank line).
fn write_pool_gauges(page: &mut String, pools: &[(Service, String, usize)]) {
    use std::fmt::Write;
    const NAME: &str = "cxmpute_pool_nodes";
    write_help_line(
        page,
        NAME,
        None,
        None,
        "Nodes per (service, model) pool; the catalogue's pools and the largest others.",
    );
    write_type_line(page, NAME, None, None, "gauge");
    for (service, model, n) in pools {
        let model = sanitize_label_value(model);
        let _ = writeln!(
            page,
            "{NAME}{{service=\"{}\",model=\"{model}\"}} {n}",
            service.as_str()
        );
    }
    page.push('\n');
}

fn describe() {
    describe_counter!(
        "cxmpute_http_requests_total",
        "Gateway calls answered, by route and HTTP status (refusals included)."
    );
    describe_histogram!(
        "cxmpute_time_to_first_byte_seconds",
        Unit::Seconds,
        "From receiving a gateway call to its response head (streams: the node's first chunk)."
    );
    describe_counter!(
        "cxmpute_requests_total",
        "Admitted requests settled, by route and outcome."
    );
    describe_histogram!(
        "cxmpute_request_duration_seconds",
        Unit::Seconds,
        "From admission to the end of the answer, by route and outcome."
    );
    describe_counter!("cxmpute_tokens_total", "Tokens metered, by route and kind.");
    describe_counter!(
        "cxmpute_units_total",
        "Other units metered (TTS characters, scraped URLs, images)."
    );
    describe_counter!(
        "cxmpute_charged_microcredits_total",
        "Micro-credits charged to users."
    );
    describe_counter!(
        "cxmpute_rewarded_microcredits_total",
        "Micro-credits rewarded to providers."
    );
    describe_counter!(
        "cxmpute_upstream_attempts_total",
        "Forwarded attempts to nodes, by service and outcome."
    );
    describe_counter!(
        "cxmpute_failovers_total",
        "Requests moved to another node after a failed attempt."
    );
    describe_counter!(
        "cxmpute_hedges_total",
        "Slow attempts hedged by a second attempt on another node."
    );
    describe_counter!(
        "cxmpute_fallbacks_total",
        "Requests moved to the next model they name, no node of the one before serving."
    );
    describe_counter!(
        "cxmpute_circuit_breaker_transitions_total",
        "Node circuit breaker changes, by the state entered."
    );
    describe_gauge!(
        "cxmpute_circuit_breakers",
        "Nodes in routing by circuit breaker state."
    );
    describe_gauge!(
        "cxmpute_pools",
        "Pools in routing, named on this page or not."
    );
    describe_gauge!("cxmpute_nodes", "Distinct nodes in the routing index.");
    describe_gauge!(
        "cxmpute_quarantined_nodes",
        "Nodes in the routing index that canary calls took out of routing."
    );
    describe_counter!(
        "cxmpute_canary_verdicts_total",
        "Canary call verdicts on nodes, by service and verdict (pass, fail, inconclusive)."
    );
    describe_counter!(
        "cxmpute_stats_flush_failures_total",
        "Failed writes of usage statistics (kept and retried)."
    );
    describe_gauge!(
        "cxmpute_stats_unsent_batches",
        "Usage statistics batches waiting to be written."
    );
    describe_counter!(
        "cxmpute_cache_hits_total",
        "Calls answered from the response cache."
    );
    describe_counter!(
        "cxmpute_cache_misses_total",
        "Calls that used the response cache and found no entry."
    );
    describe_counter!(
        "cxmpute_cache_evictions_total",
        "Response cache entries pushed out (or not let in) for room."
    );
    describe_gauge!(
        "cxmpute_cache_bytes",
        "Bytes the response cache's entries take (answers plus overhead)."
    );
    describe_gauge!("cxmpute_cache_entries", "Entries in the response cache.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_index_their_series_by_their_place_in_route_all() {
        for (i, r) in Route::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r}");
        }
    }

    #[test]
    fn pool_gauges_are_written_in_the_text_format_with_names_escaped() {
        let mut page = String::new();
        write_pool_gauges(&mut page, &[(Service::Chat, "a\"b\\c".into(), 2)]);
        assert!(page.starts_with("# HELP cxmpute_pool_nodes "), "{page}");
        assert!(page.contains("# TYPE cxmpute_pool_nodes gauge\n"), "{page}");
        assert!(
            page.contains("cxmpute_pool_nodes{service=\"chat\",model=\"a\\\"b\\\\c\"} 2\n"),
            "{page}"
        );
    }

    #[test]
    fn a_cached_series_counts_like_the_macro() {
        let m = Metrics::new();
        for status in [200, 401, 200] {
            m.http_request(Route::Embeddings, status, Duration::from_millis(3));
        }
        m.attempt(Service::Chat, AttemptOutcome::Busy);
        m.attempt(Service::Chat, AttemptOutcome::Busy);
        let page = m.handle.render();
        for line in [
            r#"cxmpute_http_requests_total{route="/v1/embeddings",status="200"} 2"#,
            r#"cxmpute_http_requests_total{route="/v1/embeddings",status="401"} 1"#,
            r#"cxmpute_upstream_attempts_total{service="chat",outcome="busy"} 2"#,
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "{line} missing from\n{page}"
            );
        }
    }
}
