//! Usage statistics, recorded off the request path.
//!
//! The pipeline adds each finished request to in-memory counters (one short
//! lock); a flush turns them into a [`StatsBatch`] with a fresh id and writes
//! it through [`Store::record_stats`]. A batch that fails to write is kept and
//! retried with the *same* id, so a retry after an unseen success adds nothing.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::error::Result;
use crate::store::Store;
use crate::types::*;

/// The scope names counters are kept under.
pub mod scope {
    use crate::types::{ProviderId, Route, Service, UserId};

    /// Per gateway endpoint.
    pub fn endpoint(route: Route) -> String {
        format!("endpoint:{}", route.path())
    }
    /// Per service and model.
    pub fn model(service: Service, model: &str) -> String {
        format!("model:{}:{model}", service.as_str())
    }
    /// Per calling application (`X-Title` / `HTTP-Referer`).
    pub fn app(app: &str) -> String {
        format!("app:{app}")
    }
    /// Per user.
    pub fn user(user: &UserId) -> String {
        format!("user:{user}")
    }
    /// Per provider.
    pub fn provider(provider: &ProviderId) -> String {
        format!("provider:{provider}")
    }
    /// The whole network.
    pub const NETWORK: &str = "network";
}

/// Counters for one finished request.
pub fn counters_of(u: &UsageRecord) -> StatsCounters {
    let mut buckets = vec![0; LATENCY_BUCKETS_MS.len() + 1];
    let i = LATENCY_BUCKETS_MS
        .iter()
        .position(|&b| u.latency_ms <= b)
        .unwrap_or(LATENCY_BUCKETS_MS.len());
    buckets[i] = 1;
    StatsCounters {
        requests: 1,
        failures: u64::from(!u.success),
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        units: u.units,
        latency_ms_sum: u.latency_ms,
        latency_buckets: buckets,
        charged: u.charged.0,
        rewarded: u.reward.0,
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<(Day, String), StatsCounters>,
    /// Batches built but not yet written, oldest first.
    unsent: Vec<StatsBatch>,
}

/// Collects counters in memory and writes them in batches.
#[derive(Default)]
pub struct StatsRecorder {
    state: Mutex<State>,
}

impl std::fmt::Debug for StatsRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsRecorder").finish_non_exhaustive()
    }
}

impl StatsRecorder {
    /// Adds one finished request to every scope it belongs to.
    pub fn record(&self, u: &UsageRecord) {
        let c = counters_of(u);
        let day = u.at.day();
        let service = u.route.service();
        let mut scopes = vec![
            scope::endpoint(u.route),
            scope::model(service, &u.model),
            scope::user(&u.user_id),
            scope::NETWORK.to_owned(),
        ];
        if let Some(app) = &u.app {
            scopes.push(scope::app(app));
        }
        if let Some(p) = &u.provider_id {
            scopes.push(scope::provider(p));
        }
        let mut s = self.state.lock();
        for sc in scopes {
            s.pending.entry((day, sc)).or_default().add(&c);
        }
    }

    /// Writes everything collected so far. On failure the batch is kept (with
    /// its id) for the next flush and the error returned.
    pub async fn flush(&self, store: &dyn Store) -> Result<()> {
        {
            let mut s = self.state.lock();
            if !s.pending.is_empty() {
                let deltas = std::mem::take(&mut s.pending)
                    .into_iter()
                    .map(|((d, sc), c)| (d, sc, c))
                    .collect();
                let id = format!("stats_{}", crate::secret::random_token(20));
                s.unsent.push(StatsBatch { id, deltas });
            }
        }
        loop {
            let Some(batch) = self.state.lock().unsent.first().cloned() else {
                return Ok(());
            };
            store.record_stats(&batch).await?;
            self.state.lock().unsent.remove(0);
        }
    }
}
