//! Usage statistics, recorded off the request path.
//!
//! The pipeline adds each finished request to in-memory counters (one short
//! lock); a flush turns them into a [`StatsBatch`] with a fresh id and writes
//! it through [`StatsStore::record_stats`](crate::store::StatsStore::record_stats).
//! A batch that fails to write is kept and retried with the *same* id, so a
//! retry after an unseen success adds nothing.
//!
//! ## Counter scopes and gauge scopes
//!
//! Most scopes are plain counters of finished requests (see [`scope`]). The
//! network snapshot ([`Broker::record_network_snapshot`]) keeps *gauges* (how many
//! nodes a pool has) in the same [`StatsCounters`], read differently:
//! `requests` counts the samples taken and `units` sums the sampled values,
//! so `units / requests` is the day's average. Sums of samples add up like
//! any counter, so batching, retries and several hosts sampling one store
//! all keep the average right. Gauge scopes are `pool:`, `nodes:` and
//! `nodes`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use parking_lot::Mutex;

#[cfg(doc)]
use crate::broker::Broker;
use crate::error::Result;
use crate::store::Store;
use crate::types::*;

/// The scope names counters are kept under.
pub mod scope {
    use crate::types::{ProviderId, ProvisionId, Route, Service, UserId};

    /// The prefix of every [`endpoint`] scope.
    pub const ENDPOINT_PREFIX: &str = "endpoint:";
    /// The prefix of every [`model`] scope.
    pub const MODEL_PREFIX: &str = "model:";
    /// The prefix of every [`app`] scope.
    pub const APP_PREFIX: &str = "app:";
    /// The prefix of every [`user`] scope.
    pub const USER_PREFIX: &str = "user:";
    /// The prefix of every [`provider`] scope.
    pub const PROVIDER_PREFIX: &str = "provider:";
    /// The prefix of every [`service`] scope.
    pub const SERVICE_PREFIX: &str = "service:";

    /// Per gateway endpoint.
    pub fn endpoint(route: Route) -> String {
        format!("{ENDPOINT_PREFIX}{}", route.path())
    }
    /// Per service and model.
    pub fn model(service: Service, model: &str) -> String {
        format!("{MODEL_PREFIX}{}:{model}", service.as_str())
    }
    /// Per calling application (`X-Title` / `HTTP-Referer`).
    pub fn app(app: &str) -> String {
        format!("{APP_PREFIX}{app}")
    }
    /// Per user.
    pub fn user(user: &UserId) -> String {
        format!("{USER_PREFIX}{user}")
    }
    /// Per provider.
    pub fn provider(provider: &ProviderId) -> String {
        format!("{PROVIDER_PREFIX}{provider}")
    }
    /// The whole network.
    pub const NETWORK: &str = "network";

    /// Per service (every model and route of it).
    pub fn service(service: Service) -> String {
        format!("{SERVICE_PREFIX}{}", service.as_str())
    }
    /// One user's requests to one model. Its own prefix (not under `user:`),
    /// so that a `user:` prefix query still lists only users.
    pub fn user_model(user: &UserId, service: Service, model: &str) -> String {
        format!("user-model:{user}:{}:{model}", service.as_str())
    }
    /// The prefix of every [`user_model`] scope of a user.
    pub fn user_model_prefix(user: &UserId) -> String {
        format!("user-model:{user}:")
    }
    /// One user's requests from one application.
    pub fn user_app(user: &UserId, app: &str) -> String {
        format!("user-app:{user}:{app}")
    }
    /// The prefix of every [`user_app`] scope of a user.
    pub fn user_app_prefix(user: &UserId) -> String {
        format!("user-app:{user}:")
    }
    /// Requests served by one node of a provider.
    pub fn provider_node(provider: &ProviderId, node: &ProvisionId) -> String {
        format!("provider-node:{provider}:{node}")
    }
    /// The prefix of every [`provider_node`] scope of a provider.
    pub fn provider_node_prefix(provider: &ProviderId) -> String {
        format!("provider-node:{provider}:")
    }
    /// Requests served by a provider for one model.
    pub fn provider_model(provider: &ProviderId, service: Service, model: &str) -> String {
        format!("provider-model:{provider}:{}:{model}", service.as_str())
    }
    /// The prefix of every [`provider_model`] scope of a provider.
    pub fn provider_model_prefix(provider: &ProviderId) -> String {
        format!("provider-model:{provider}:")
    }

    /// Gauge: nodes in the pool of one (service, model).
    pub fn pool(service: Service, model: &str) -> String {
        format!("pool:{}:{model}", service.as_str())
    }
    /// The prefix of every [`pool`] gauge.
    pub const POOL_PREFIX: &str = "pool:";
    /// Gauge: distinct nodes serving a service.
    pub fn nodes_of(service: Service) -> String {
        format!("nodes:{}", service.as_str())
    }
    /// Gauge: distinct nodes in routing.
    pub const NODES: &str = "nodes";
}

/// Counters for one finished request.
pub(crate) fn counters_of(u: &UsageRecord) -> StatsCounters {
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
    /// Finished requests, summed by [`Shape`] until a flush spreads them
    /// over their scopes.
    calls: HashMap<u64, Vec<(Shape, StatsCounters)>>,
    /// Gauge samples, and calls already spread over their scopes.
    pending: HashMap<(Day, String), StatsCounters>,
    /// Batches built but not yet written, oldest first.
    unsent: Vec<StatsBatch>,
}

/// What a finished request's scopes are made of. Most calls repeat a shape
/// already seen (one user calling one model through one node), so the
/// request path only adds to that shape's counters: one hash of borrowed
/// fields, no allocation, no scope name formatted. The nine or so scope
/// names are made once per shape, at flush (a profile of a busy host showed
/// their `format!`s and hashing as 3 % of its CPU when made per call).
#[derive(Clone, PartialEq, Eq)]
struct Shape {
    day: Day,
    route: Route,
    user: UserId,
    model: String,
    app: Option<String>,
    provider: Option<ProviderId>,
    provision: Option<ProvisionId>,
}

impl Shape {
    fn of(u: &UsageRecord) -> Shape {
        Shape {
            day: u.at.day(),
            route: u.route,
            user: u.user_id.clone(),
            model: u.model.clone(),
            app: u.app.clone(),
            provider: u.provider_id.clone(),
            provision: u.provision_id.clone(),
        }
    }

    fn is_of(&self, u: &UsageRecord) -> bool {
        self.day == u.at.day()
            && self.route == u.route
            && self.user == u.user_id
            && self.model == u.model
            && self.app == u.app
            && self.provider == u.provider_id
            && self.provision == u.provision_id
    }

    /// The hash a request of this shape is summed under.
    fn hash(keys: &RandomState, u: &UsageRecord) -> u64 {
        keys.hash_one((
            u.at.day().0,
            u.route,
            &u.user_id,
            &u.model,
            &u.app,
            &u.provider_id,
            &u.provision_id,
        ))
    }

    /// Every scope a request of this shape counts in.
    fn scopes(&self) -> Vec<String> {
        let service = self.route.service();
        let mut scopes = vec![
            scope::endpoint(self.route),
            scope::model(service, &self.model),
            scope::user(&self.user),
            scope::NETWORK.to_owned(),
            scope::service(service),
            scope::user_model(&self.user, service, &self.model),
        ];
        if let Some(app) = &self.app {
            scopes.push(scope::app(app));
            scopes.push(scope::user_app(&self.user, app));
        }
        if let Some(p) = &self.provider {
            scopes.push(scope::provider(p));
            scopes.push(scope::provider_model(p, service, &self.model));
            if let Some(n) = &self.provision {
                scopes.push(scope::provider_node(p, n));
            }
        }
        scopes
    }
}

/// Adds one finished request to counters of its shape, in place (what
/// `add(&counters_of(u))` does, without building the counters).
fn add_call(c: &mut StatsCounters, u: &UsageRecord) {
    let i = LATENCY_BUCKETS_MS
        .iter()
        .position(|&b| u.latency_ms <= b)
        .unwrap_or(LATENCY_BUCKETS_MS.len());
    if c.latency_buckets.len() <= i {
        c.latency_buckets.resize(LATENCY_BUCKETS_MS.len() + 1, 0);
    }
    c.latency_buckets[i] += 1;
    c.requests += 1;
    c.failures += u64::from(!u.success);
    c.input_tokens += u.input_tokens;
    c.output_tokens += u.output_tokens;
    c.units += u.units;
    c.latency_ms_sum += u.latency_ms;
    c.charged += u.charged.0;
    c.rewarded += u.reward.0;
}

/// Collects counters in memory and writes them in batches.
#[derive(Default)]
pub(crate) struct StatsRecorder {
    state: Mutex<State>,
    /// Keys the shape hashes (callers choose models and app names).
    keys: RandomState,
}

impl std::fmt::Debug for StatsRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsRecorder").finish_non_exhaustive()
    }
}

impl StatsRecorder {
    /// Adds one finished request to every scope it belongs to (summed by
    /// shape until the next flush; see [`Shape`]).
    pub(crate) fn record(&self, u: &UsageRecord) {
        let h = Shape::hash(&self.keys, u);
        let mut s = self.state.lock();
        let same = s.calls.entry(h).or_default();
        match same.iter_mut().find(|(shape, _)| shape.is_of(u)) {
            Some((_, c)) => add_call(c, u),
            None => same.push((Shape::of(u), counters_of(u))),
        }
    }

    /// Adds one of the platform's canary calls (see [`crate::verify`]):
    /// only to its provider's scopes, so what a provider earned matches its
    /// statistics, while users', models' and the network's figures count
    /// users' traffic alone.
    pub(crate) fn record_canary(&self, u: &UsageRecord) {
        let (Some(p), Some(n)) = (&u.provider_id, &u.provision_id) else {
            return;
        };
        let c = counters_of(u);
        let service = u.route.service();
        let scopes = [
            scope::provider(p),
            scope::provider_model(p, service, &u.model),
            scope::provider_node(p, n),
        ];
        let mut s = self.state.lock();
        for sc in scopes {
            s.pending.entry((u.at.day(), sc)).or_default().add(&c);
        }
    }

    /// Adds one sample of a gauge (see the [module docs](self)): one more
    /// sample and `value` more to the day's sum.
    pub(crate) fn sample(&self, day: Day, scope: String, value: u64) {
        let c = StatsCounters {
            requests: 1,
            units: value,
            ..StatsCounters::default()
        };
        self.state
            .lock()
            .pending
            .entry((day, scope))
            .or_default()
            .add(&c);
    }

    /// Batches built but not yet written (a failing store shows here).
    pub(crate) fn unsent_batches(&self) -> usize {
        self.state.lock().unsent.len()
    }

    /// Writes everything collected so far. On failure the batch is kept (with
    /// its id) for the next flush and the error returned.
    pub(crate) async fn flush(&self, store: &dyn Store) -> Result<()> {
        {
            let mut s = self.state.lock();
            let calls = std::mem::take(&mut s.calls);
            for (shape, c) in calls.into_values().flatten() {
                for sc in shape.scopes() {
                    s.pending.entry((shape.day, sc)).or_default().add(&c);
                }
            }
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
            // Taken out while it is written (no copy, and a flush running at
            // the same time never writes or drops the same batch); put back
            // first in line if the write fails, to be retried with its id.
            let batch = {
                let mut s = self.state.lock();
                if s.unsent.is_empty() {
                    return Ok(());
                }
                s.unsent.remove(0)
            };
            if let Err(e) = store.record_stats(&batch).await {
                self.state.lock().unsent.insert(0, batch);
                return Err(e);
            }
        }
    }
}
