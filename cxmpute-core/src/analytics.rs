//! Usage analytics: what the daily counters of [`crate::stats`] mean.
//!
//! The counters are sums (requests, tokens, latency, a latency histogram,
//! micro-credits); everything shown to people is derived here, once, so the
//! stats routes, the account routes and the dashboard agree:
//!
//! - averages are sums divided by counts, computed when read;
//! - the 95th percentile comes from the histogram buckets the way
//!   Prometheus' `histogram_quantile` does it (linear inside the bucket; in
//!   the overflow bucket, the highest finite bound);
//! - tokens per second is output tokens over the wall time of the requests
//!   that produced them (only where there were output tokens: chat);
//! - gauges (node counts) are sample sums over sample counts (see the
//!   [`crate::stats`] module docs).
//!
//! Date ranges are inclusive UTC days, at most [`MAX_RANGE_DAYS`] long.

use std::collections::HashMap;

use futures::future::try_join_all;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::stats::scope;
use crate::types::*;

pub use cxmpute_api::analytics::{
    AdminStats, DateRange, DayStats, GaugeDay, GaugeSeries, GaugeSummary, LedgerView, Named,
    NetworkStats, NodePerformance, PoolNow, ProviderStats, RangeQuery, Summary, UserStats,
    DEFAULT_RANGE_DAYS, MAX_RANGE_DAYS,
};

/// How many entries a ranking (top users, top apps) holds at most.
pub const TOP_N: usize = 20;

/// The `q` quantile (0 to 1) of a latency histogram in milliseconds, as
/// Prometheus' `histogram_quantile` computes it: find the bucket holding the
/// rank, interpolate linearly between its bounds; in the overflow bucket,
/// answer the highest finite bound. `None` when the histogram is empty.
pub fn latency_quantile_ms(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = LATENCY_BUCKETS_MS.get(i) else {
                return LATENCY_BUCKETS_MS.last().copied();
            };
            let lower = if i == 0 { 0 } else { LATENCY_BUCKETS_MS[i - 1] };
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower + ((upper - lower) as f64 * within).round() as u64);
        }
        below += n;
    }
    LATENCY_BUCKETS_MS.last().copied()
}

/// How a [`Summary`] is derived from counters, and trimmed to what a caller
/// may see. A trait because `Summary` is defined with the API's types (the
/// client reads it) while the arithmetic belongs here; `Summary::of(..)`
/// reads as it would for an inherent method.
pub(crate) trait SummaryOf: Sized {
    /// Everything derived from `c`, money included.
    fn of(c: &StatsCounters) -> Self;
    /// The same without what users paid and providers earned (public views).
    fn without_money(self) -> Self;
    /// The same without what users paid (a provider's view).
    fn without_charges(self) -> Self;
    /// The same without what providers earned (a user's view).
    fn without_money_but_charged(self) -> Self;
}

impl SummaryOf for Summary {
    fn of(c: &StatsCounters) -> Summary {
        let avg = (c.requests > 0).then(|| c.latency_ms_sum / c.requests);
        let tps = (c.output_tokens > 0 && c.latency_ms_sum > 0)
            .then(|| round2(c.output_tokens as f64 * 1000.0 / c.latency_ms_sum as f64));
        Summary {
            requests: c.requests,
            failures: c.failures,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            units: c.units,
            avg_latency_ms: avg,
            p95_latency_ms: latency_quantile_ms(&c.latency_buckets, 0.95),
            tokens_per_second: tps,
            charged: Some(Credits(c.charged)),
            rewarded: Some(Credits(c.rewarded)),
            platform: Some(Credits(c.charged).saturating_sub(Credits(c.rewarded))),
        }
    }

    fn without_money(mut self) -> Summary {
        self.charged = None;
        self.rewarded = None;
        self.platform = None;
        self
    }

    fn without_charges(mut self) -> Summary {
        self.charged = None;
        self.platform = None;
        self
    }

    fn without_money_but_charged(mut self) -> Summary {
        self.rewarded = None;
        self.platform = None;
        self
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn gauge_avg(c: &StatsCounters) -> f64 {
    if c.requests == 0 {
        0.0
    } else {
        round2(c.units as f64 / c.requests as f64)
    }
}

/// A daily series over the whole range: days without counters are zeros,
/// so a chart's x axis is the calendar.
pub fn day_series(
    range: DateRange,
    rows: Vec<(Day, StatsCounters)>,
    shape: impl Fn(Summary) -> Summary,
) -> Vec<DayStats> {
    per_day(range, rows, |day, c| DayStats {
        day,
        stats: shape(Summary::of(c)),
    })
}

/// A gauge's daily averages over the whole range (zeros where no sample was taken).
pub fn gauge_series(range: DateRange, rows: Vec<(Day, StatsCounters)>) -> Vec<GaugeDay> {
    per_day(range, rows, |day, c| GaugeDay {
        day,
        samples: c.requests,
        average: gauge_avg(c),
    })
}

/// One value per day of `range`, made by `f` from the day's counters in
/// `rows` (zeros for a day without a row).
pub(crate) fn per_day<T>(
    range: DateRange,
    rows: Vec<(Day, StatsCounters)>,
    f: impl Fn(Day, &StatsCounters) -> T,
) -> Vec<T> {
    let by_day: HashMap<Day, StatsCounters> = rows.into_iter().collect();
    let zero = StatsCounters::default();
    range
        .days()
        .map(|day| f(day, by_day.get(&day).unwrap_or(&zero)))
        .collect()
}

/// The sum of a series.
pub fn total_of<'a>(rows: impl IntoIterator<Item = &'a StatsCounters>) -> StatsCounters {
    let mut t = StatsCounters::default();
    for c in rows {
        t.add(c);
    }
    t
}

/// A breakdown from a prefix query: names with the prefix cut off, busiest first.
pub fn breakdown(
    prefix: &str,
    rows: Vec<(String, StatsCounters)>,
    shape: impl Fn(Summary) -> Summary,
) -> Vec<Named> {
    let mut v: Vec<Named> = rows
        .into_iter()
        .map(|(s, c)| Named {
            name: s.strip_prefix(prefix).unwrap_or(&s).to_owned(),
            stats: shape(Summary::of(&c)),
        })
        .collect();
    v.sort_by(|a, b| {
        b.stats
            .requests
            .cmp(&a.stats.requests)
            .then_with(|| a.name.cmp(&b.name))
    });
    v
}

/// Gauge averages over the range from a prefix query, by name.
pub fn gauge_breakdown(prefix: &str, rows: Vec<(String, StatsCounters)>) -> Vec<GaugeSummary> {
    rows.into_iter()
        .map(|(s, c)| GaugeSummary {
            name: s.strip_prefix(prefix).unwrap_or(&s).to_owned(),
            samples: c.requests,
            average: gauge_avg(&c),
        })
        .collect()
}

/// The first `limit` of `v`, and how many were cut off.
fn bounded<T>(mut v: Vec<T>, limit: usize) -> (Vec<T>, usize) {
    let omitted = v.len().saturating_sub(limit);
    v.truncate(limit);
    (v, omitted)
}

/// Analytics over a broker's store and routing index.
#[derive(Clone, Debug)]
pub struct Analytics {
    broker: Broker,
}

impl Broker {
    /// Usage analytics (see [`crate::analytics`]).
    pub fn analytics(&self) -> Analytics {
        Analytics {
            broker: self.clone(),
        }
    }

    /// Takes one snapshot of the network into the gauge scopes: nodes per
    /// pool of the catalogue (`pool:<service>:<model>`), distinct nodes per
    /// service (`nodes:<service>`) and distinct nodes in routing (`nodes`).
    /// [`Broker::run_maintenance`] calls it every round.
    ///
    /// Only the catalogue's pools get a scope: every scope is a stored row
    /// per day, kept for good, and other pools are named by strangers, who
    /// could otherwise add rows at will. Their nodes still count in the
    /// `nodes` gauges.
    pub fn record_network_snapshot(&self) {
        let day = self.now().day();
        let pools = self.pools();
        let stats = self.stats_recorder();
        let provisions = pools.provisions();
        // Distinct nodes per service: a node counts once however many of
        // the service's models it serves.
        let per_service = Service::ALL.map(|s| {
            provisions
                .iter()
                .filter(|nodes| nodes.iter().any(|n| n.entry.service == s))
                .count()
        });
        for m in self.catalogue().models() {
            let nodes = pools.pool_size(m.service, &m.model);
            // A pool is sampled while it has routable nodes, as before.
            if nodes > 0 {
                stats.sample(day, scope::pool(m.service, &m.model), nodes as u64);
            }
        }
        for (service, n) in Service::ALL.into_iter().zip(per_service) {
            stats.sample(day, scope::nodes_of(service), n as u64);
        }
        stats.sample(day, scope::NODES.to_owned(), provisions.len() as u64);
    }
}

impl Analytics {
    fn store(&self) -> &dyn crate::store::Store {
        self.broker.store().as_ref()
    }

    async fn series(&self, scope: &str, range: DateRange) -> Result<Vec<(Day, StatsCounters)>> {
        self.store().stats(scope, range.from, range.to).await
    }

    async fn prefixed(
        &self,
        prefix: &str,
        range: DateRange,
    ) -> Result<Vec<(String, StatsCounters)>> {
        self.store()
            .stats_by_prefix(prefix, range.from, range.to)
            .await
    }

    /// The public network picture over `range` (no money, no users).
    pub async fn network(&self, range: DateRange) -> Result<NetworkStats> {
        let public = Summary::without_money;
        let (net, endpoints, services, models, nodes, pools) = futures::try_join!(
            self.series(scope::NETWORK, range),
            self.prefixed(scope::ENDPOINT_PREFIX, range),
            self.prefixed(scope::SERVICE_PREFIX, range),
            self.prefixed(scope::MODEL_PREFIX, range),
            self.series(scope::NODES, range),
            self.prefixed(scope::POOL_PREFIX, range),
        )?;
        let by_service = try_join_all(Service::ALL.iter().map(|s| async move {
            let rows = self.series(&scope::nodes_of(*s), range).await?;
            Ok::<_, Error>(GaugeSeries {
                name: s.as_str().to_owned(),
                days: gauge_series(range, rows),
            })
        }))
        .await?;
        let totals = public(Summary::of(&total_of(net.iter().map(|r| &r.1))));
        let limit = self.broker.config().public_list_limit;
        let listed = self.broker.listed_pools();
        let pools_now_omitted = listed.omitted();
        let pools_now: Vec<PoolNow> = (listed.pools.into_iter())
            .map(|(service, model, nodes)| PoolNow {
                service,
                model,
                nodes,
            })
            .collect();
        // Busiest first already: the list keeps the busiest.
        let (models, models_omitted) =
            bounded(breakdown(scope::MODEL_PREFIX, models, public), limit);
        let mut pools = gauge_breakdown(scope::POOL_PREFIX, pools);
        pools.sort_by(|a, b| {
            b.average
                .total_cmp(&a.average)
                .then_with(|| a.name.cmp(&b.name))
        });
        let (pools, pools_omitted) = bounded(pools, limit);
        Ok(NetworkStats {
            range,
            totals,
            days: day_series(range, net, public),
            endpoints: breakdown(scope::ENDPOINT_PREFIX, endpoints, public),
            services: breakdown(scope::SERVICE_PREFIX, services, public),
            models,
            models_omitted,
            nodes_now: self.broker.pools().node_count(),
            pools_now,
            pools_now_omitted,
            nodes: gauge_series(range, nodes),
            nodes_by_service: by_service,
            pools,
            pools_omitted,
        })
    }

    /// A user's own usage over `range`, with what they were charged.
    pub async fn user(&self, user: &UserId, range: DateRange) -> Result<UserStats> {
        let keep = Summary::without_money_but_charged;
        let (own, model_prefix, app_prefix) = (
            scope::user(user),
            scope::user_model_prefix(user),
            scope::user_app_prefix(user),
        );
        let (days, models, apps) = futures::try_join!(
            self.series(&own, range),
            self.prefixed(&model_prefix, range),
            self.prefixed(&app_prefix, range),
        )?;
        Ok(UserStats {
            user_id: user.clone(),
            range,
            totals: keep(Summary::of(&total_of(days.iter().map(|r| &r.1)))),
            days: day_series(range, days, keep),
            models: breakdown(&model_prefix, models, keep),
            apps: breakdown(&app_prefix, apps, keep),
        })
    }

    /// A provider's earnings (the total as of `p`, read for this request)
    /// and node performance over `range`.
    pub async fn provider(&self, p: &Provider, range: DateRange) -> Result<ProviderStats> {
        let provider = &p.id;
        let keep = Summary::without_charges;
        let (own, model_prefix, node_prefix) = (
            scope::provider(provider),
            scope::provider_model_prefix(provider),
            scope::provider_node_prefix(provider),
        );
        let (days, models, nodes, provisions) = futures::try_join!(
            self.series(&own, range),
            self.prefixed(&model_prefix, range),
            self.prefixed(&node_prefix, range),
            self.store().provisions_by_provider(provider),
        )?;
        let mut counted: HashMap<String, StatsCounters> = nodes
            .into_iter()
            .map(|(s, c)| (s.strip_prefix(&node_prefix).unwrap_or(&s).to_owned(), c))
            .collect();
        let network = self.broker.network();
        let mut out = Vec::new();
        for p in provisions {
            let c = counted.remove(p.id.as_str());
            if p.state == ProvisionState::Ended && c.is_none() {
                continue;
            }
            let live = network.node_status(&p.id);
            let live = live.as_ref();
            out.push(NodePerformance {
                routable: live.is_some_and(|s| s.routable),
                breaker: live.map(|s| s.breaker.as_str().to_owned()),
                in_flight: live.map_or(0, |s| s.in_flight),
                latency_ewma_ms: live.map(|s| s.latency_ewma_us / 1000).filter(|&ms| ms > 0),
                verification: self.broker.verification_of(&p.id),
                stats: keep(Summary::of(&c.unwrap_or_default())),
                provision_id: p.id,
                state: p.state,
            });
        }
        // Nodes deleted since they served: still part of the range's story.
        for (id, c) in counted {
            out.push(NodePerformance {
                provision_id: ProvisionId::new(id),
                state: ProvisionState::Ended,
                routable: false,
                breaker: None,
                in_flight: 0,
                latency_ewma_ms: None,
                verification: Default::default(),
                stats: keep(Summary::of(&c)),
            });
        }
        Ok(ProviderStats {
            provider_id: provider.clone(),
            range,
            earnings_total: p.earnings,
            totals: keep(Summary::of(&total_of(days.iter().map(|r| &r.1)))),
            days: day_series(range, days, keep),
            models: breakdown(&model_prefix, models, keep),
            nodes: out,
        })
    }

    /// Everything over `range`, for operators.
    pub async fn admin(&self, range: DateRange) -> Result<AdminStats> {
        let all = |s: Summary| s;
        let (net, endpoints, services, models, apps, users, providers, nodes, pools, ledger) = futures::try_join!(
            self.series(scope::NETWORK, range),
            self.prefixed(scope::ENDPOINT_PREFIX, range),
            self.prefixed(scope::SERVICE_PREFIX, range),
            self.prefixed(scope::MODEL_PREFIX, range),
            self.prefixed(scope::APP_PREFIX, range),
            self.prefixed(scope::USER_PREFIX, range),
            self.prefixed(scope::PROVIDER_PREFIX, range),
            self.series(scope::NODES, range),
            self.prefixed(scope::POOL_PREFIX, range),
            self.store().ledger_totals(),
        )?;
        let top = |mut v: Vec<Named>, key: fn(&Named) -> i64| {
            v.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.name.cmp(&b.name)));
            v.truncate(TOP_N);
            v
        };
        let mut top_apps = breakdown(scope::APP_PREFIX, apps, all);
        top_apps.truncate(TOP_N);
        Ok(AdminStats {
            range,
            totals: Summary::of(&total_of(net.iter().map(|r| &r.1))),
            days: day_series(range, net, all),
            endpoints: breakdown(scope::ENDPOINT_PREFIX, endpoints, all),
            services: breakdown(scope::SERVICE_PREFIX, services, all),
            models: breakdown(scope::MODEL_PREFIX, models, all),
            top_apps,
            top_users: top(breakdown(scope::USER_PREFIX, users, all), |n| {
                n.stats.charged.unwrap_or_default().0
            }),
            top_providers: top(breakdown(scope::PROVIDER_PREFIX, providers, all), |n| {
                n.stats.rewarded.unwrap_or_default().0
            }),
            ledger: LedgerView {
                settlements: ledger.settlements,
                charged: ledger.charged,
                rewarded: ledger.rewarded,
                platform: ledger.platform(),
                reserved: ledger.reserved,
            },
            nodes_now: self.broker.pools().node_count(),
            nodes: gauge_series(range, nodes),
            pools: gauge_breakdown(scope::POOL_PREFIX, pools),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(counts: &[(usize, u64)]) -> Vec<u64> {
        let mut b = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        for &(i, n) in counts {
            b[i] = n;
        }
        b
    }

    #[test]
    fn p95_interpolates_inside_its_bucket() {
        // 100 requests: 90 under 25 ms, 10 in (25, 50]. Rank 95 is the 5th of
        // the 10 in the second bucket: halfway from 25 to 50.
        assert_eq!(
            latency_quantile_ms(&hist(&[(0, 90), (1, 10)]), 0.95),
            Some(38)
        );
        // All in the first bucket: 95% of the way from 0 to 25.
        assert_eq!(latency_quantile_ms(&hist(&[(0, 20)]), 0.95), Some(24));
        assert_eq!(latency_quantile_ms(&hist(&[]), 0.95), None);
        assert_eq!(latency_quantile_ms(&[], 0.95), None);
    }

    #[test]
    fn p95_in_the_overflow_bucket_is_the_highest_bound() {
        let last = LATENCY_BUCKETS_MS.len();
        assert_eq!(
            latency_quantile_ms(&hist(&[(0, 1), (last, 99)]), 0.95),
            Some(60_000)
        );
    }

    #[test]
    fn summaries_derive_averages_and_rates() {
        let c = StatsCounters {
            requests: 4,
            failures: 1,
            output_tokens: 300,
            latency_ms_sum: 2_000,
            latency_buckets: hist(&[(7, 4)]),
            charged: 1_234,
            rewarded: 500,
            ..StatsCounters::default()
        };
        let s = Summary::of(&c);
        assert_eq!(s.avg_latency_ms, Some(500));
        assert_eq!(s.tokens_per_second, Some(150.0));
        assert_eq!(s.charged, Some(Credits(1_234)));
        assert_eq!(s.platform, Some(Credits(734)), "charged less rewarded");
        let p = s.clone().without_money();
        assert_eq!((p.charged, p.rewarded, p.platform), (None, None, None));
        let provider = s.clone().without_charges();
        assert_eq!(
            (provider.rewarded, provider.platform),
            (Some(Credits(500)), None)
        );
        let user = s.clone().without_money_but_charged();
        assert_eq!((user.charged, user.platform), (Some(Credits(1_234)), None));
        let e = Summary::of(&StatsCounters::default());
        assert_eq!(
            (e.avg_latency_ms, e.p95_latency_ms, e.tokens_per_second),
            (None, None, None)
        );
    }

    #[test]
    fn gauges_average_their_samples() {
        let range = DateRange::new(Day(10), Day(11)).unwrap();
        let c = StatsCounters {
            requests: 4,
            units: 10,
            ..StatsCounters::default()
        };
        let s = gauge_series(range, vec![(Day(11), c)]);
        assert_eq!(s[0].samples, 0);
        assert_eq!(s[1].average, 2.5);
    }
}
