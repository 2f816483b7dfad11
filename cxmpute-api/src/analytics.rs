//! The statistics reports of the HTTP API (`GET /v1/stats/*`): what the
//! host's analytics computes from its daily counters, as the client reads it.
//!
//! Only the data lives here; the host derives it (averages, percentiles,
//! rankings) in `cxmpute_core::analytics`.
//!
//! Date ranges are inclusive UTC days, at most [`MAX_RANGE_DAYS`] long.

use serde::{Deserialize, Serialize};

use crate::types::*;
use crate::Error;

/// The longest range a stats query may cover, in days.
pub const MAX_RANGE_DAYS: u32 = 366;
/// The range used when a query names none: the last 30 days, today included.
pub const DEFAULT_RANGE_DAYS: u32 = 30;

/// `?from=YYYY-MM-DD&to=YYYY-MM-DD`, both optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct RangeQuery {
    /// First day (inclusive, UTC). Default: 29 days before `to`.
    #[cfg_attr(feature = "openapi", param(value_type = Option<String>, format = Date, example = "2025-01-01"))]
    pub from: Option<String>,
    /// Last day (inclusive, UTC). Default: today.
    #[cfg_attr(feature = "openapi", param(value_type = Option<String>, format = Date, example = "2025-01-30"))]
    pub to: Option<String>,
}

/// An inclusive range of UTC days, checked: `from <= to`, at most
/// [`MAX_RANGE_DAYS`] days.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DateRange {
    /// First day.
    pub from: Day,
    /// Last day.
    pub to: Day,
}

impl DateRange {
    /// A checked range. `InvalidInput` when `from > to` or it is too long.
    pub fn new(from: Day, to: Day) -> Result<Self, Error> {
        if from > to {
            return Err(Error::InvalidInput(format!(
                "`from` ({from}) is after `to` ({to})"
            )));
        }
        let days = i64::from(to.0) - i64::from(from.0) + 1;
        if days > i64::from(MAX_RANGE_DAYS) {
            return Err(Error::InvalidInput(format!(
                "the range covers {days} days; at most {MAX_RANGE_DAYS} are allowed"
            )));
        }
        Ok(DateRange { from, to })
    }

    /// The range a query asks for; missing ends default to the last
    /// [`DEFAULT_RANGE_DAYS`] days up to `today`.
    pub fn from_query(q: &RangeQuery, today: Day) -> Result<Self, Error> {
        let parse = |name: &str, v: &Option<String>| -> Result<Option<Day>, Error> {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<Day>().map_err(|_| {
                        Error::InvalidInput(format!(
                            "`{name}` must be a date (YYYY-MM-DD), not `{s}`"
                        ))
                    })
                })
                .transpose()
        };
        let from = parse("from", &q.from)?;
        let to = parse("to", &q.to)?;
        let span = DEFAULT_RANGE_DAYS as i32 - 1;
        let (from, to) = match (from, to) {
            (Some(f), Some(t)) => (f, t),
            (Some(f), None) => (f, today.max(f)),
            (None, Some(t)) => (t.plus_days(-span), t),
            (None, None) => (today.plus_days(-span), today),
        };
        DateRange::new(from, to)
    }

    /// Every day of the range, in order.
    pub fn days(&self) -> impl Iterator<Item = Day> {
        (self.from.0..=self.to.0).map(Day)
    }

    /// How many days it covers.
    pub fn len(&self) -> u32 {
        (self.to.0 - self.from.0 + 1) as u32
    }

    /// Never: a range holds at least one day (for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a set of counters means: sums, plus averages and percentiles derived
/// from them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Summary {
    /// Requests finished.
    pub requests: u64,
    /// Of which failed.
    pub failures: u64,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Other units (TTS characters, scraped URLs, images).
    pub units: u64,
    /// Average latency (admission to the end of the answer), ms.
    pub avg_latency_ms: Option<u64>,
    /// 95th percentile latency from the histogram buckets, ms.
    pub p95_latency_ms: Option<u64>,
    /// Output tokens per second of request time. Only chat produces output
    /// tokens, so read it on chat scopes (`service:chat`, a chat model or
    /// endpoint); on mixed scopes other services' time dilutes it.
    pub tokens_per_second: Option<f64>,
    /// Micro-credits charged to users (absent where the caller may not see it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged: Option<Credits>,
    /// Micro-credits rewarded to providers (absent where the caller may not see it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewarded: Option<Credits>,
    /// Micro-credits the platform kept: charged less rewarded (admins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Credits>,
}

/// One day of a series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DayStats {
    /// The day.
    pub day: Day,
    /// What happened that day.
    #[serde(flatten)]
    pub stats: Summary,
}

/// One entry of a breakdown (an endpoint, a model, an application...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Named {
    /// What it is: the part of the scope after its kind, e.g.
    /// `/v1/chat/completions`, `chat:llama3.2:3b`, `MyApp`.
    pub name: String,
    /// Its totals over the range.
    #[serde(flatten)]
    pub stats: Summary,
}

/// One day of a gauge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GaugeDay {
    /// The day.
    pub day: Day,
    /// Snapshots taken that day.
    pub samples: u64,
    /// The average of the samples (0 when none were taken).
    pub average: f64,
}

/// A gauge over a range: the average of every sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GaugeSummary {
    /// What it is, e.g. `chat:llama3.2:3b` (a pool) or `chat` (a service).
    pub name: String,
    /// Snapshots taken.
    pub samples: u64,
    /// Their average.
    pub average: f64,
}

/// A pool as the routing index has it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolNow {
    /// The service.
    pub service: Service,
    /// The model.
    pub model: String,
    /// Nodes in the pool.
    pub nodes: usize,
}

/// A gauge's daily series, e.g. the nodes serving one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GaugeSeries {
    /// What it measures, e.g. `chat`.
    pub name: String,
    /// Each day of the range.
    pub days: Vec<GaugeDay>,
}

/// The public picture of the network: `GET /v1/stats/network`.
///
/// Its lists of models and pools are bounded: anyone may register nodes
/// serving any names, so each names at most the broker's
/// `public_list_limit` entries (100 by default) and counts the rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkStats {
    /// The range covered.
    pub range: DateRange,
    /// Totals over the range (no money).
    pub totals: Summary,
    /// Each day of the range (no money).
    pub days: Vec<DayStats>,
    /// Per gateway endpoint.
    pub endpoints: Vec<Named>,
    /// Per service.
    pub services: Vec<Named>,
    /// Per service and model (`service:model`), busiest first; at most
    /// the list limit.
    pub models: Vec<Named>,
    /// Models over the range not in `models`.
    pub models_omitted: usize,
    /// Distinct nodes in routing now.
    pub nodes_now: usize,
    /// Pools now, sorted by service and model: the catalogue's, then the
    /// largest others; at most the list limit.
    pub pools_now: Vec<PoolNow>,
    /// Pools now not in `pools_now`.
    pub pools_now_omitted: usize,
    /// Distinct nodes in routing, averaged per day.
    pub nodes: Vec<GaugeDay>,
    /// Distinct nodes per service, averaged per day.
    pub nodes_by_service: Vec<GaugeSeries>,
    /// Nodes per pool (`service:model`) of the catalogue, averaged over the
    /// range, largest first; at most the list limit.
    pub pools: Vec<GaugeSummary>,
    /// Pools with samples in the range not in `pools`.
    pub pools_omitted: usize,
}

/// A user's usage: `GET /v1/stats/me`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserStats {
    /// Whose.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub user_id: UserId,
    /// The range covered.
    pub range: DateRange,
    /// Totals over the range, with what was charged.
    pub totals: Summary,
    /// Each day of the range.
    pub days: Vec<DayStats>,
    /// Per service and model (`service:model`).
    pub models: Vec<Named>,
    /// Per calling application (`X-Title` / `HTTP-Referer`).
    pub apps: Vec<Named>,
}

/// How one node is doing: live figures from routing and its counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodePerformance {
    /// The node.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub provision_id: ProvisionId,
    /// Its lifecycle state.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub state: ProvisionState,
    /// Whether it is in routing now.
    pub routable: bool,
    /// Its circuit breaker: `closed`, `open` or `half_open` (absent when not in routing).
    pub breaker: Option<String>,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Latency estimate (EWMA), ms.
    pub latency_ewma_ms: Option<u64>,
    /// What the broker's canary calls found (quarantined: out of routing, and why).
    #[serde(default)]
    pub verification: crate::wire::NodeVerification,
    /// Totals over the range (what it earned; not what users paid).
    #[serde(flatten)]
    pub stats: Summary,
}

/// A provider's earnings and nodes: `GET /v1/stats/provider`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProviderStats {
    /// Whose.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub provider_id: ProviderId,
    /// The range covered.
    pub range: DateRange,
    /// Earned and not yet paid out, all time (micro-credits).
    pub earnings_total: Credits,
    /// Totals over the range, with what was rewarded.
    pub totals: Summary,
    /// Each day of the range.
    pub days: Vec<DayStats>,
    /// Per service and model (`service:model`).
    pub models: Vec<Named>,
    /// Each of its nodes (ended ones only when they served in the range).
    pub nodes: Vec<NodePerformance>,
}

/// Everything, for operators: `GET /v1/stats/admin`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminStats {
    /// The range covered.
    pub range: DateRange,
    /// Totals over the range, money included.
    pub totals: Summary,
    /// Each day of the range, money included.
    pub days: Vec<DayStats>,
    /// Per gateway endpoint.
    pub endpoints: Vec<Named>,
    /// Per service.
    pub services: Vec<Named>,
    /// Per service and model.
    pub models: Vec<Named>,
    /// The busiest applications (by requests).
    pub top_apps: Vec<Named>,
    /// The users who paid the most (name: user id).
    pub top_users: Vec<Named>,
    /// The providers who earned the most (name: provider id).
    pub top_providers: Vec<Named>,
    /// All-time ledger sums (settlements, charged, rewarded, reserved).
    pub ledger: LedgerView,
    /// Distinct nodes in routing now.
    pub nodes_now: usize,
    /// Distinct nodes in routing, averaged per day.
    pub nodes: Vec<GaugeDay>,
    /// Nodes per pool, averaged over the range.
    pub pools: Vec<GaugeSummary>,
}

/// The all-time ledger, in micro-credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LedgerView {
    /// Settlements applied.
    pub settlements: u64,
    /// Charged to users.
    pub charged: Credits,
    /// Rewarded to providers.
    pub rewarded: Credits,
    /// What the platform kept.
    pub platform: Credits,
    /// Held in open reservations.
    pub reserved: Credits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_and_defaulted() {
        let today: Day = "2025-03-10".parse().unwrap();
        let q = |f: Option<&str>, t: Option<&str>| RangeQuery {
            from: f.map(str::to_owned),
            to: t.map(str::to_owned),
        };
        let r = DateRange::from_query(&q(None, None), today).unwrap();
        assert_eq!(
            (r.from.to_string(), r.to, r.len()),
            ("2025-02-09".into(), today, 30)
        );
        let r = DateRange::from_query(&q(Some("2025-01-01"), Some("2025-01-01")), today).unwrap();
        assert_eq!(r.len(), 1);
        let r = DateRange::from_query(&q(Some("2024-01-01"), Some("2024-12-31")), today).unwrap();
        assert_eq!(r.len(), 366);
        for (f, t) in [
            (Some("2024-01-01"), Some("2025-01-01")),
            (Some("2025-01-02"), Some("2025-01-01")),
            (Some("2025-02-30"), None),
            (Some("yesterday"), None),
        ] {
            assert!(matches!(
                DateRange::from_query(&q(f, t), today),
                Err(Error::InvalidInput(_))
            ));
        }
    }
}
