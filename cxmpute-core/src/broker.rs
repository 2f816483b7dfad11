//! The [`Broker`]: the whole request pipeline, implemented once.
//!
//! 1. **Authenticate** the API key (hashed, looked up by hash).
//! 2. **Admit**: validate the body, price its upper bounds, hold that much
//!    of the user's credits and the key's limit: in memory on a store this
//!    host owns, else in one atomic store write (see
//!    [`LedgerStore`](crate::store::LedgerStore#owned-and-shared-stores)).
//! 3. **Select** a node from the in-memory pool index (no store read).
//! 4. **Forward** with adaptive timeouts and a hedged second attempt;
//!    before the first byte reaches the client a failed node is marked and
//!    another is tried.
//! 5. **Stream** bytes through as they arrive, metering usage on the way,
//!    within bounds on bytes, time, output and the caller's reading speed.
//! 6. **Settle** in one atomic store write: charge the metered cost, release
//!    the rest, reward the provider, record usage. Failures cost nothing.
//! 7. **Record** statistics off the request path, in batches.
//!
//! ## What a request costs
//!
//! The reservation is the price of the request's upper bounds: its body's
//! bytes as input tokens (a token is at least one byte; each chat image as
//! [`BrokerConfig::image_input_tokens`]), and as output tokens the output
//! limit (`max_completion_tokens`, else `max_tokens`, else the configured
//! default; the node is sent exactly that limit) times the choices asked
//! for (`n`, at most [`BrokerConfig::max_choices`]). The charge is the price of what was metered,
//! never more than the reservation. Usage reported by a node is clamped to
//! those bounds; when a node reports none, the broker counts it (streamed
//! content chunks, or a quarter of the text's bytes).
//!
//! * Success: the full price of the metered usage; the provider earns what
//!   the [`RewardPolicy`] gives (at most the charge).
//! * Failure before the answer starts (every attempt failed, no node, the
//!   nodes refused the request): nothing is charged and nothing rewarded.
//! * A stream cut by the node after the first byte (it broke, stalled, sent
//!   garbage, more output than reserved, more bytes than
//!   [`BrokerConfig::max_response_bytes`], or ran past
//!   [`BrokerConfig::max_stream_duration`]): the stream ends with an
//!   explicit error event; the user pays for the input (as the broker counts
//!   it) and the output chunks delivered, without the per-request fee; the
//!   provider earns nothing. A node's usage claim is not believed for a
//!   stream it did not finish.
//! * The client going away mid-stream, or reading so slowly that a chunk
//!   waits [`BrokerConfig::client_send_timeout`]: the upstream call is
//!   cancelled; the user pays for what was passed on, including the
//!   per-request fee, and the provider earns its reward, since it did
//!   nothing wrong.
//! * The client going away before a non-streamed answer: the call runs to
//!   its end on the node (each call runs in a task of its own) and is
//!   charged and rewarded as if it had been read, as OpenAI charges a
//!   completion whose client left. No hold is ever left to the
//!   stale-reservation sweep by a caller.
//!
//! ## Nodes are strangers
//!
//! * Every wait adapts to what the pool usually takes (an EWMA of
//!   successes per service, model and phase): an attempt times out after
//!   [`BrokerConfig::adaptive_timeout_multiple`] times that, within
//!   [`BrokerConfig::adaptive_timeout_floor`] and the configured ceilings
//!   ([`BrokerConfig::first_byte_timeout`], and the shorter
//!   [`BrokerConfig::stream_header_timeout`] for a stream's headers, which
//!   servers send before prefill). A slow model's long prefill is not a
//!   hang; a node suddenly twenty times slower than usual is.
//! * An attempt still waiting for its response headers after
//!   [`BrokerConfig::hedge_multiple`] times the usual is hedged: a second
//!   attempt starts on another node and the first answer wins. The loser is
//!   judged in the background until its own timeout, so a hung node is
//!   found and ejected at its first timeout while no caller waits for it.
//!   Meanwhile its latency estimate rises to the time it has been waiting:
//!   a call in flight longer than usual counts as that slow.
//! * A timeout takes the node out of routing at once (the circuit breaker
//!   opens); other failures count toward the breaker's failure rate.
//! * A node's refusal (400/413/422) is confirmed on another node. If another
//!   node serves the call, each refusal counts as the refusing node's
//!   failure; if every node tried refuses, the caller gets a 400 in the
//!   broker's own words. A node's words (error texts, error events,
//!   comments) never reach a caller, and neither does a node's address.
//! * The HTTP client takes no proxy from the environment, so every node
//!   address passes the egress guard's resolver.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;

use crate::accounts::{key_may_administer, normalize_email, AuthConfig, AuthState};
use crate::admission::Admission;
use crate::clock::{Clock, SystemClock};
use crate::egress::{self, EgressPolicy, EgressRules};
use crate::error::{Error, Result};
use crate::health::{self, HealthConfig, HealthReport};
use crate::keycache::KeyCache;
use crate::mail::{ConsoleMailer, Mailer};
use crate::metrics::Metrics;
use crate::network::NetworkConfig;
use crate::pool::{PoolIndex, RoutePreferences};
use crate::pricing::{default_prices, PriceTable};
use crate::reward::{FlatReward, RewardPolicy};
use crate::secret::Secret;
use crate::select::{PeakEwmaSelector, ProvisionSelector};
use crate::services;
use crate::stats::StatsRecorder;
use crate::store::Store;
use crate::types::*;
use crate::wire::*;

/// Limits and timeouts of the broker.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Largest answer accepted from a node: a whole JSON answer, or all the
    /// bytes of a stream together. Going over it is a node failure.
    pub max_response_bytes: usize,
    /// Nodes tried per request before giving up.
    pub max_attempts: usize,
    /// TCP connect timeout to a node.
    pub connect_timeout: Duration,
    /// The longest wait for a node's first response bytes: the ceiling of
    /// the adaptive wait (see the module docs) for a non-streamed answer
    /// and for a stream's first chunk.
    pub first_byte_timeout: Duration,
    /// The ceiling of the adaptive wait for a streamed call's response
    /// headers, which model servers send before they start generating.
    pub stream_header_timeout: Duration,
    /// An attempt waiting this many times what its pool usually takes is a
    /// hang: it times out and its node leaves routing.
    pub adaptive_timeout_multiple: u32,
    /// The adaptive wait is never shorter than this.
    pub adaptive_timeout_floor: Duration,
    /// A second attempt starts on another node once the first has waited
    /// this many times what its pool usually takes for the response headers
    /// (0: never hedge).
    pub hedge_multiple: u32,
    /// The hedge never starts sooner than this.
    pub hedge_floor: Duration,
    /// When the hedge starts while the pool has no measurement yet.
    pub hedge_unmeasured: Duration,
    /// Longest silence between two chunks of an answer.
    pub idle_timeout: Duration,
    /// The longest a stream may run. Kept well below `reservation_ttl`, so a
    /// stream always settles before its hold could be swept.
    pub max_stream_duration: Duration,
    /// The longest one chunk may wait for a caller to read the ones before
    /// it; a caller slower than this is treated as gone and pays for what
    /// was passed on.
    pub client_send_timeout: Duration,
    /// `max_tokens` sent to the node when the caller gave none (and reserved for).
    pub default_max_tokens: u32,
    /// Most choices (`n`) one chat request may ask for; each is reserved and
    /// charged as a whole completion of the output limit. More is a 400.
    pub max_choices: u32,
    /// Most images one chat request may carry.
    pub max_images: usize,
    /// The input tokens one chat image is priced as: reserved for each image
    /// and the most charged for it, whatever its size.
    pub image_input_tokens: u64,
    /// Which addresses URLs in callers' requests (images for a node to
    /// fetch) may name, apart from [`BrokerConfig::egress`]: a cluster may
    /// run its nodes on private addresses and still refuse callers' URLs
    /// there.
    pub url_egress: EgressRules,
    /// A node not heard from for this long leaves routing.
    pub heartbeat_ttl: Duration,
    /// A reservation older than this is released (its host died mid-request).
    pub reservation_ttl: Duration,
    /// Which node endpoints are accepted.
    pub egress: EgressPolicy,
    /// Health probes and the circuit breaker (see [`crate::health`]).
    pub health: HealthConfig,
    /// The provider network: catalogue and assignment (see [`crate::network`]).
    pub network: NetworkConfig,
    /// Sign-in, sessions and the admin role.
    pub auth: AuthConfig,
    /// Most API keys a host holds in memory (default 100,000), so that a
    /// call with a key seen lately makes no store read; unknown keys are
    /// held too, a sixteenth as many. The least useful go first when full.
    /// 0 holds none: every gateway call reads its key from the store.
    pub key_cache_capacity: u64,
    /// How long a key held in memory is trusted (default 1 s): a key
    /// revoked or changed, or an account suspended, through another host
    /// sharing the store is refused here at most this long after (by this
    /// host's clock). The host that makes the change applies it at once.
    /// Keys in use are read again in the background after half of it, so
    /// calls do not wait for the store. 0 turns the memory off.
    pub key_cache_ttl: Duration,
    /// Most accounts a host holds in memory to admit calls from, on a store
    /// it owns (default 100,000; see
    /// [`LedgerStore::owned_by_one_host`](crate::store::LedgerStore::owned_by_one_host)).
    /// Past it, the least recently used accounts with no call in flight go
    /// and are read again when next used; an account with calls in flight
    /// is always held.
    pub account_capacity: usize,
    /// The most pools or models a public list names (default 100):
    /// `GET /v1/models`, the pool and model lists of `GET /v1/stats/network`
    /// and the per-pool series of `GET /metrics`. Anyone may register nodes
    /// serving any names, so these lists name the catalogue's pools first,
    /// then the largest (the busiest, for models by traffic), and count the
    /// rest without naming them.
    pub public_list_limit: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_body_bytes: 4 << 20,
            max_response_bytes: 32 << 20,
            max_attempts: 3,
            connect_timeout: Duration::from_secs(3),
            first_byte_timeout: Duration::from_secs(60),
            stream_header_timeout: Duration::from_secs(10),
            adaptive_timeout_multiple: 20,
            adaptive_timeout_floor: Duration::from_secs(2),
            hedge_multiple: 4,
            hedge_floor: Duration::from_millis(50),
            hedge_unmeasured: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            max_stream_duration: Duration::from_secs(10 * 60),
            client_send_timeout: Duration::from_secs(30),
            default_max_tokens: 4096,
            max_choices: 8,
            max_images: 8,
            image_input_tokens: 1024,
            url_egress: EgressRules::public_only(),
            heartbeat_ttl: Duration::from_secs(90),
            reservation_ttl: Duration::from_secs(30 * 60),
            egress: EgressPolicy::PublicOnly,
            health: HealthConfig::default(),
            network: NetworkConfig::default(),
            auth: AuthConfig::default(),
            key_cache_capacity: 100_000,
            key_cache_ttl: Duration::from_secs(1),
            account_capacity: 100_000,
            public_list_limit: 100,
        }
    }
}

impl BrokerConfig {
    /// Refuses settings that would break the money rules: a call must always
    /// settle before the stale-reservation sweep could release its hold.
    fn check(&self) -> Result<()> {
        let attempts = u32::try_from(self.max_attempts).unwrap_or(u32::MAX);
        let longest = self
            .first_byte_timeout
            .saturating_mul(attempts.saturating_add(1))
            .saturating_add(self.max_stream_duration)
            .saturating_add(self.client_send_timeout)
            .saturating_add(self.idle_timeout);
        if longest >= self.reservation_ttl {
            return Err(Error::InvalidInput(format!(
                "a call may last {longest:?} (first-byte timeouts, stream duration, send \
                 timeout), not below reservation_ttl ({:?})",
                self.reservation_ttl
            )));
        }
        if self.max_attempts == 0 {
            return Err(Error::InvalidInput(
                "max_attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Allows loopback and private node endpoints (tests, private clusters).
    pub fn allow_private_endpoints(mut self) -> Self {
        self.egress = EgressPolicy::AllowPrivate;
        self
    }
}

/// Builds a [`Broker`] from its parts; everything but the store has a default.
pub struct BrokerBuilder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    selector: Arc<dyn ProvisionSelector>,
    rewards: Arc<dyn RewardPolicy>,
    mailer: Arc<dyn Mailer>,
    config: BrokerConfig,
    default_prices: Vec<PriceEntry>,
}

impl BrokerBuilder {
    /// Sets the clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the node selector (default: power of two choices over peak-EWMA
    /// latency, [`PeakEwmaSelector`]).
    pub fn selector(mut self, selector: Arc<dyn ProvisionSelector>) -> Self {
        self.selector = selector;
        self
    }

    /// Sets the reward policy (default: 0.01 credits per request).
    pub fn reward_policy(mut self, policy: Arc<dyn RewardPolicy>) -> Self {
        self.rewards = policy;
        self
    }

    /// Sets the mailer (default: console, codes hidden).
    pub fn mailer(mut self, mailer: Arc<dyn Mailer>) -> Self {
        self.mailer = mailer;
        self
    }

    /// Sets limits and timeouts.
    pub fn config(mut self, config: BrokerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets sign-in, session and admin settings (kept in [`BrokerConfig::auth`]).
    pub fn auth(mut self, auth: AuthConfig) -> Self {
        self.config.auth = auth;
        self
    }

    /// Sets health probing and circuit breaking (kept in [`BrokerConfig::health`]).
    pub fn health(mut self, health: HealthConfig) -> Self {
        self.config.health = health;
        self
    }

    /// Sets the provider network's catalogue and assignment (kept in
    /// [`BrokerConfig::network`]).
    pub fn network(mut self, network: NetworkConfig) -> Self {
        self.config.network = network;
        self
    }

    /// Sets the prices used where the store has none (default: [`default_prices`]).
    pub fn default_prices(mut self, prices: Vec<PriceEntry>) -> Self {
        self.default_prices = prices;
        self
    }

    /// Loads prices and pools from the store and returns the broker.
    pub async fn build(self) -> Result<Broker> {
        self.config.check()?;
        let http = reqwest::Client::builder()
            // No proxy from the environment (`HTTP(S)_PROXY`): a proxy would
            // resolve node names itself, around the guarded resolver below.
            .no_proxy()
            // Node endpoints were checked when they registered; this checks
            // every later resolution too, so DNS cannot re-point one.
            .dns_resolver(Arc::new(egress::GuardedResolver(self.config.egress)))
            .connect_timeout(self.config.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| Error::backend("building the HTTP client", e))?;
        let auth = AuthState::new(&self.config.auth)?;
        let (capacity, ttl) = (self.config.key_cache_capacity, self.config.key_cache_ttl);
        let inner = Inner {
            keys: KeyCache::new(self.store.clone(), self.clock.clone(), capacity, ttl),
            admission: Admission::new(self.store.clone(), self.config.account_capacity),
            auth,
            // Stored prices are applied over these by the refresh below.
            prices: PriceTable::new(self.default_prices, Vec::new()),
            pools: PoolIndex::new(),
            stats: StatsRecorder::default(),
            metrics: Metrics::new(),
            store: self.store,
            clock: self.clock,
            selector: self.selector,
            rewards: self.rewards,
            mailer: self.mailer,
            config: self.config,
            http,
            usual: Default::default(),
        };
        let broker = Broker {
            inner: Arc::new(inner),
        };
        broker.refresh_pools().await?;
        Ok(broker)
    }
}

/// What every clone of a [`Broker`] shares.
pub(crate) struct Inner {
    pub(crate) auth: AuthState,
    /// API keys held in memory for the gateway (see [`crate::keycache`]).
    pub(crate) keys: KeyCache,
    /// Where calls' credits are held while they run (see [`crate::admission`]).
    pub(crate) admission: Admission,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) selector: Arc<dyn ProvisionSelector>,
    pub(crate) rewards: Arc<dyn RewardPolicy>,
    pub(crate) mailer: Arc<dyn Mailer>,
    pub(crate) config: BrokerConfig,
    pub(crate) prices: PriceTable,
    pub(crate) pools: PoolIndex,
    pub(crate) stats: StatsRecorder,
    pub(crate) metrics: Metrics,
    pub(crate) http: reqwest::Client,
    /// How long each pool usually takes to answer (adaptive timeouts, hedging).
    pub(crate) usual: crate::gateway::UsualDurations,
}

/// The marketplace broker. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("selector", &self.inner.selector.name())
            .finish_non_exhaustive()
    }
}

/// A gateway call as it arrives.
#[derive(Clone, Debug)]
pub struct GatewayRequest {
    /// The bearer secret, if one was sent.
    pub api_key: Option<Secret>,
    /// The route called.
    pub route: Route,
    /// The raw body.
    pub body: Bytes,
    /// The calling application (`X-Title`, else `HTTP-Referer`).
    pub app: Option<String>,
    /// Routing preferences (a preferred region, from `X-Cxmpute-Region`).
    pub preferences: RoutePreferences,
}

impl GatewayRequest {
    /// A call of `route` with `body`, authenticated by `api_key`, with no
    /// application name and no routing preference.
    pub fn new(api_key: Option<Secret>, route: Route, body: Bytes) -> Self {
        GatewayRequest {
            api_key,
            route,
            body,
            app: None,
            preferences: RoutePreferences::none(),
        }
    }
}

/// A gateway answer.
pub enum GatewayResponse {
    /// A complete answer.
    Complete {
        /// Its content type.
        content_type: String,
        /// Its body.
        body: Bytes,
    },
    /// A streamed answer: bytes as they arrive.
    Stream {
        /// Its content type.
        content_type: String,
        /// The bytes.
        body: BoxStream<'static, std::result::Result<Bytes, std::io::Error>>,
    },
}

impl std::fmt::Debug for GatewayResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewayResponse::Complete { content_type, body } => {
                write!(f, "Complete({content_type}, {} bytes)", body.len())
            }
            GatewayResponse::Stream { content_type, .. } => write!(f, "Stream({content_type})"),
        }
    }
}

impl Broker {
    /// Everything the clones share, for the broker's own modules.
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// A builder around a store.
    pub fn builder(store: Arc<dyn Store>) -> BrokerBuilder {
        BrokerBuilder {
            store,
            clock: Arc::new(SystemClock),
            selector: Arc::new(PeakEwmaSelector),
            rewards: Arc::new(FlatReward::default()),
            mailer: Arc::new(ConsoleMailer::new()),
            config: BrokerConfig::default(),
            default_prices: default_prices(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Keys and revocations of sessions (see [`crate::accounts`]).
    pub(crate) fn auth_state(&self) -> &AuthState {
        &self.inner.auth
    }

    /// The routing index.
    pub fn pools(&self) -> &PoolIndex {
        &self.inner.pools
    }

    /// This broker's Prometheus metrics (see [`crate::metrics`]).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The in-memory usage counters (see [`crate::stats`]).
    pub(crate) fn stats_recorder(&self) -> &StatsRecorder {
        &self.inner.stats
    }

    /// The mailer.
    pub fn mailer(&self) -> &Arc<dyn Mailer> {
        &self.inner.mailer
    }

    /// The in-memory price list.
    pub fn prices(&self) -> &PriceTable {
        &self.inner.prices
    }

    /// Now, by the broker's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    // ---- maintenance ---------------------------------------------------------

    /// Rebuilds the routing index from the store (at start, and periodically
    /// when several hosts share one store).
    ///
    /// Prices are reloaded too, so a price set through one host reaches the
    /// others on their next refresh.
    pub async fn refresh_pools(&self) -> Result<()> {
        let entries = self.inner.store.pool_entries().await?;
        self.inner.pools.rebuild(entries);
        for price in self.inner.store.prices().await? {
            self.inner.prices.set(price);
        }
        Ok(())
    }

    /// One round of housekeeping: expire silent nodes, release stale
    /// reservations, delete spent sign-in codes and expired refresh tokens,
    /// flush statistics. Run it on an interval (see
    /// [`Broker::spawn_maintenance`]) or call it from tests with a manual clock.
    pub async fn run_maintenance(&self) -> Result<()> {
        let now = self.now();
        let expired = self
            .inner
            .store
            .expire_provisions(now.minus(self.inner.config.heartbeat_ttl))
            .await?;
        for id in &expired {
            tracing::info!(provision = %id, "node expired: no heartbeat");
            self.inner.pools.remove(id);
        }
        self.inner
            .store
            .release_stale_reservations(now.minus(self.inner.config.reservation_ttl))
            .await?;
        self.accounts().prune().await?;
        self.record_network_snapshot();
        let pools = &self.inner.pools;
        self.inner.usual.retain(|s, m| pools.is_offered(s, m));
        self.inner.metrics.upkeep();
        self.flush_stats().await
    }

    /// One round of node health probes (see [`crate::health`]): nodes that
    /// fail them leave routing, nodes past their cooldown that pass return.
    /// Spawned by [`Broker::spawn_maintenance`]; tests call it with a manual clock.
    pub async fn run_health_checks(&self) -> HealthReport {
        let i = &self.inner;
        health::run_health_checks(&i.config.health, &i.pools, &i.http, i.clock.as_ref()).await
    }

    /// Writes the statistics collected so far.
    pub async fn flush_stats(&self) -> Result<()> {
        let r = self.inner.stats.flush(self.inner.store.as_ref()).await;
        if r.is_err() {
            self.inner.metrics.stats_flush_failed();
        }
        r
    }

    /// Runs [`Broker::run_maintenance`] and [`Broker::refresh_pools`] every
    /// `every`, and [`Broker::run_health_checks`] every
    /// [`HealthConfig::probe_interval`], until the returned handle is aborted.
    pub fn spawn_maintenance(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let b = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // `interval` panics on zero; probing faster than this helps nobody.
            let probe_every = b.inner.config.health.probe_interval;
            let mut probe = tokio::time::interval(probe_every.max(Duration::from_millis(100)));
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = probe.tick() => {
                        b.run_health_checks().await;
                        continue;
                    }
                }
                if let Err(e) = b.run_maintenance().await {
                    tracing::warn!(error = %e, "maintenance failed; will retry");
                }
                if let Err(e) = b.refresh_pools().await {
                    tracing::warn!(error = %e, "pool refresh failed; will retry");
                }
            }
        })
    }

    /// Flushes what is buffered. Call before the process exits.
    pub async fn shutdown(&self) -> Result<()> {
        self.flush_stats().await
    }

    // ---- authentication --------------------------------------------------------

    /// The API key for a bearer secret, read from the store (gateway calls
    /// read it from memory instead: [`BrokerConfig::key_cache_ttl`]).
    /// `Unauthorized` for missing, unknown or revoked keys.
    pub async fn authenticate_key(&self, secret: Option<&Secret>) -> Result<ApiKey> {
        let secret = secret.ok_or_else(|| {
            Error::Unauthorized("missing API key: send `Authorization: Bearer <key>`".into())
        })?;
        let key = match self.inner.store.api_key_by_hash(&secret.hash()).await {
            Ok(k) => k,
            Err(Error::NotFound(_)) => return Err(Error::Unauthorized("invalid API key".into())),
            Err(e) => return Err(e),
        };
        if key.revoked_at.is_some() {
            return Err(Error::Unauthorized("API key revoked".into()));
        }
        Ok(key)
    }

    /// The provider behind a provider key. `Forbidden` when suspended.
    pub async fn authenticate_provider(&self, secret: Option<&Secret>) -> Result<Provider> {
        let secret = secret.ok_or_else(|| Error::Unauthorized("missing provider key".into()))?;
        let p = match self.inner.store.provider_by_key_hash(&secret.hash()).await {
            Ok(p) => p,
            Err(Error::NotFound(_)) => {
                return Err(Error::Unauthorized("invalid provider key".into()))
            }
            Err(e) => return Err(e),
        };
        if p.suspended.is_some() {
            return Err(Error::Forbidden("provider suspended".into()));
        }
        Ok(p)
    }

    // ---- accounts (admin) ------------------------------------------------------

    /// Creates a user with `credits` and a first API key; returns the key's secret.
    pub async fn create_user(
        &self,
        email: &str,
        credits: Credits,
        is_admin: bool,
    ) -> Result<(User, ApiKey, Secret)> {
        let email = normalize_email(email)?;
        if credits.is_negative() {
            return Err(services::invalid("credits must not be negative"));
        }
        let user = User {
            id: UserId::generate(),
            email,
            credits,
            is_admin,
            suspended: None,
            created_at: self.now(),
        };
        self.inner.store.create_user(&user).await?;
        let (key, secret) = self
            .create_api_key(&user.id, "default", None, Vec::new())
            .await?;
        Ok((user, key, secret))
    }

    /// Creates an API key for a user; returns it and its secret (shown once).
    pub async fn create_api_key(
        &self,
        user: &UserId,
        name: &str,
        credit_limit: Option<Credits>,
        permitted_routes: Vec<Route>,
    ) -> Result<(ApiKey, Secret)> {
        self.create_api_key_with_secret(
            user,
            name,
            credit_limit,
            permitted_routes,
            Secret::generate_api_key(),
        )
        .await
    }

    async fn create_api_key_with_secret(
        &self,
        user: &UserId,
        name: &str,
        credit_limit: Option<Credits>,
        permitted_routes: Vec<Route>,
        secret: Secret,
    ) -> Result<(ApiKey, Secret)> {
        // The one path every key is made by: the same checks for a user's
        // own keys, an admin's and the ones made with an account.
        let name = name.trim();
        crate::accounts::Accounts::check_key_fields(
            Some(name),
            credit_limit,
            Some(&permitted_routes),
        )?;
        let mut permitted_routes = permitted_routes;
        permitted_routes.sort();
        permitted_routes.dedup();
        let max = self.inner.config.auth.max_keys_per_user;
        let keys = self.inner.store.api_keys(user).await?;
        if keys.iter().filter(|k| k.revoked_at.is_none()).count() >= max {
            return Err(Error::Conflict(format!(
                "at most {max} active keys per account; revoke one first"
            )));
        }
        let key = ApiKey {
            id: ApiKeyId::generate(),
            user_id: user.clone(),
            hash: secret.hash(),
            name: name.to_owned(),
            prefix: secret.display_prefix(),
            credit_limit,
            credits_left: credit_limit,
            permitted_routes,
            created_at: self.now(),
            last_used_at: None,
            revoked_at: None,
        };
        self.inner.store.create_api_key(&key).await?;
        self.inner.keys.forget(&key.hash); // it may be held as unknown
        Ok((key, secret))
    }

    /// The user with (normalised) `email`, created with `is_admin` and no
    /// credits if absent; `true` when this call created it. Safe against
    /// concurrent callers: one user, whoever wins, and the losers read it.
    pub(crate) async fn user_for_email(
        &self,
        email: String,
        is_admin: bool,
    ) -> Result<(User, bool)> {
        match self.inner.store.user_by_email(&email).await {
            Ok(u) => return Ok((u, false)),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let u = User {
            id: UserId::generate(),
            email,
            credits: Credits::ZERO,
            is_admin,
            suspended: None,
            created_at: self.now(),
        };
        match self.inner.store.create_user(&u).await {
            Ok(()) => Ok((u, true)),
            // Another caller (or host) created it first.
            Err(Error::AlreadyExists(_)) => {
                Ok((self.inner.store.user_by_email(&u.email).await?, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure an admin account for `email` exists with an API key that
    /// administers (an unrestricted one: restricted keys never do). Returns a
    /// new key's secret when one was created: on first start (or when the
    /// admin holds no active unrestricted key), or when `key` names a secret
    /// the store does not know yet (it is then stored, hashed, and not
    /// returned). `Conflict` when `key` is a restricted key of the admin's.
    pub async fn ensure_admin(&self, email: &str, key: Option<Secret>) -> Result<Option<Secret>> {
        let (user, _) = self.user_for_email(normalize_email(email)?, true).await?;
        if !user.is_admin {
            return Err(Error::Conflict(format!(
                "{} exists and is not an admin",
                user.email
            )));
        }
        match key {
            Some(secret) => {
                match self.inner.store.api_key_by_hash(&secret.hash()).await {
                    Ok(k) if k.user_id == user.id && key_may_administer(&k) => {}
                    Ok(k) if k.user_id == user.id => {
                        return Err(Error::Conflict(
                            "that admin key is restricted (routes or a credit limit) and \
                             cannot administer"
                                .into(),
                        ))
                    }
                    Ok(_) => {
                        return Err(Error::Conflict(
                            "that admin key belongs to another account".into(),
                        ))
                    }
                    Err(Error::NotFound(_)) => {
                        self.create_api_key_with_secret(
                            &user.id,
                            "admin",
                            None,
                            Vec::new(),
                            secret,
                        )
                        .await?;
                    }
                    Err(e) => return Err(e),
                }
                Ok(None)
            }
            None => {
                let keys = self.inner.store.api_keys(&user.id).await?;
                // Restricted keys do not administer: the admin needs one that does.
                if keys
                    .iter()
                    .any(|k| k.revoked_at.is_none() && key_may_administer(k))
                {
                    return Ok(None);
                }
                let (_, secret) = self
                    .create_api_key(&user.id, "admin", None, Vec::new())
                    .await?;
                Ok(Some(secret))
            }
        }
    }

    /// Adds (or removes) credits, recorded with who and why. On a store this
    /// host owns, credits held by calls in flight cannot be removed
    /// (`InsufficientCredits`), and what is added is spendable at once.
    pub async fn grant_credits(
        &self,
        user: &UserId,
        amount: Credits,
        by: &str,
        reason: &str,
    ) -> Result<Credits> {
        let grant = CreditGrant {
            user_id: user.clone(),
            amount,
            by: by.to_owned(),
            reason: reason.to_owned(),
            at: self.now(),
        };
        self.inner.admission.grant(&grant).await
    }

    /// Creates a provider account; returns it and its key (shown once).
    pub async fn create_provider(
        &self,
        email: &str,
        user: Option<UserId>,
    ) -> Result<(Provider, Secret)> {
        let secret = Secret::generate_provider_key();
        let p = Provider {
            id: ProviderId::generate(),
            user_id: user,
            email: normalize_email(email)?,
            key_hash: secret.hash(),
            earnings: Credits::ZERO,
            suspended: None,
            created_at: self.now(),
        };
        self.inner.store.create_provider(&p).await?;
        Ok((p, secret))
    }

    /// Stores a price and uses it at once.
    pub async fn put_price(&self, price: PriceEntry) -> Result<()> {
        let negative = [
            price.per_request,
            price.per_million_input_tokens,
            price.per_million_output_tokens,
            price.per_million_units,
        ]
        .iter()
        .any(|c| c.is_negative());
        if negative {
            return Err(services::invalid("prices must not be negative"));
        }
        self.inner.store.put_price(&price).await?;
        self.inner.prices.set(price);
        Ok(())
    }

    // ---- provider network ------------------------------------------------------

    /// Registers a node for a provider; with an endpoint and services it joins
    /// those pools at once.
    ///
    /// Everything a stranger sends is bounded first (diagnostics, location,
    /// the number of services: 400s), and a provider holds at most
    /// [`NetworkConfig::max_nodes_per_provider`] nodes (403 past it).
    pub async fn register_provision(
        &self,
        provider: &Provider,
        req: RegisterProvisionRequest,
    ) -> Result<RegisterProvisionResponse> {
        let net = &self.inner.config.network;
        net.check_device(&req.device)?;
        net.check_services(&req.services)?;
        net.check_location(&req.location)?;
        let tier = DeviceDiagnostics::from_json(&req.device)?.tier();
        let endpoint = match &req.endpoint {
            Some(e) => Some(self.check_endpoint(e).await?),
            None => None,
        };
        if endpoint.is_none() && !req.services.is_empty() {
            return Err(services::invalid(
                "services need an endpoint to be served from",
            ));
        }
        let now = self.now();
        let secret = Secret::generate(40);
        let state = if endpoint.is_some() && !req.services.is_empty() {
            ProvisionState::Ready
        } else {
            ProvisionState::Registered
        };
        let provision = Provision {
            id: ProvisionId::generate(),
            provider_id: provider.id.clone(),
            endpoint: endpoint.clone(),
            node_secret: secret.expose().to_owned(),
            device: req.device,
            location: req.location,
            tier,
            state,
            last_heartbeat: now,
            created_at: now,
        };
        let entries = pool_entries_for(&provision, &req.services)?;
        let store = &self.inner.store;
        let cap = net.max_nodes_per_provider;
        let full = || {
            Error::Forbidden(format!(
                "a provider may have at most {cap} nodes, ended ones included; \
                 delete one (DELETE /v1/provider/provisions/{{id}}) to register another"
            ))
        };
        if store.provisions_by_provider(&provider.id).await?.len() >= cap {
            return Err(full());
        }
        store.create_provision(&provision, &entries).await?;
        // Registrations running at once, on this host or another, each passed
        // the check above. Counting again now that this one is stored and
        // withdrawing it when that made too many keeps the cap whatever the
        // interleaving: the last one admitted sees every other one admitted.
        // (A burst may be refused more than it had to be; a retry succeeds.)
        if store.provisions_by_provider(&provider.id).await?.len() > cap {
            store.delete_provision(&provision.id).await?;
            return Err(full());
        }
        self.inner.pools.upsert(&provision.id, entries);
        Ok(RegisterProvisionResponse {
            provision_id: provision.id,
            node_secret: secret,
            state,
            tier,
        })
    }

    /// Checks a node endpoint under the egress policy and normalises it
    /// (no trailing slash).
    pub async fn check_endpoint(&self, endpoint: &str) -> Result<String> {
        let (url, _) = egress::check_url(endpoint, self.inner.config.egress).await?;
        Ok(url.as_str().trim_end_matches('/').to_owned())
    }

    /// A provision, if `provider` owns it; `NotFound` otherwise (whether it
    /// exists is not revealed to other providers).
    pub async fn owned_provision(
        &self,
        provider: &Provider,
        id: &ProvisionId,
    ) -> Result<Provision> {
        match self.inner.store.provision(id).await {
            Ok(p) if p.provider_id == provider.id => Ok(p),
            Ok(_) | Err(Error::NotFound(_)) => Err(Error::NotFound(format!("provision {id}"))),
            Err(e) => Err(e),
        }
    }

    /// Records a heartbeat from a provider's own node.
    pub async fn heartbeat(&self, provider: &Provider, id: &ProvisionId) -> Result<()> {
        let p = self.owned_provision(provider, id).await?;
        if p.state == ProvisionState::Ended {
            return Err(Error::Conflict(format!("provision {id} has ended")));
        }
        self.inner.store.heartbeat(id, self.now()).await
    }

    /// Deletes a provider's own node: it leaves every pool at once and is
    /// gone (to keep it and start it again later, end it instead:
    /// [`Broker::end_provision`]).
    pub async fn delete_provision(&self, provider: &Provider, id: &ProvisionId) -> Result<()> {
        self.owned_provision(provider, id).await?;
        self.delete_any_provision(id).await
    }

    /// Deletes any node, whoever owns it (`NotFound` if there is none), and
    /// takes it out of every pool at once: for administration.
    pub(crate) async fn delete_any_provision(&self, id: &ProvisionId) -> Result<()> {
        self.inner.store.delete_provision(id).await?;
        self.inner.pools.remove(id);
        Ok(())
    }

    /// A provider's nodes as it sees them.
    pub async fn provider_provisions(&self, provider: &Provider) -> Result<Vec<ProvisionView>> {
        let list = self
            .inner
            .store
            .provisions_by_provider(&provider.id)
            .await?;
        Ok(list.into_iter().map(|p| self.view(p)).collect())
    }

    /// The public view of a node.
    pub fn view(&self, p: Provision) -> ProvisionView {
        let entries = self.inner.pools.entries_of(&p.id);
        ProvisionView {
            healthy: self.inner.pools.is_healthy(&p.id),
            services: entries
                .into_iter()
                .map(|e| ServedModel {
                    service: e.service,
                    model: e.model,
                })
                .collect(),
            provision_id: p.id,
            state: p.state,
            endpoint: p.endpoint,
            tier: p.tier,
            location: p.location,
            last_heartbeat: p.last_heartbeat,
        }
    }

    /// The pools public lists name: at most
    /// [`BrokerConfig::public_list_limit`], the catalogue's first, then the
    /// largest (see [`PoolIndex::listed`]).
    pub fn listed_pools(&self) -> crate::pool::ListedPools {
        let catalogue: std::collections::HashSet<(Service, &str)> = (self.inner.config)
            .network
            .catalogue
            .models()
            .iter()
            .map(|m| (m.service, m.model.as_str()))
            .collect();
        self.inner
            .pools
            .listed(self.inner.config.public_list_limit, |s, m| {
                catalogue.contains(&(s, m))
            })
    }

    /// The models served now, with healthy node counts: those of
    /// [`Broker::listed_pools`].
    pub fn models(&self) -> ModelList {
        let data = self
            .listed_pools()
            .pools
            .into_iter()
            .map(|(service, model, nodes)| ModelInfo {
                id: model,
                object: "model".into(),
                created: 0,
                owned_by: "cxmpute".into(),
                service,
                nodes,
            })
            .collect();
        ModelList {
            object: "list".into(),
            data,
        }
    }
}

/// The pool entries of a node for the (service, model) pairs it serves.
pub fn pool_entries_for(p: &Provision, services: &[ServedModel]) -> Result<Vec<PoolEntry>> {
    let Some(endpoint) = &p.endpoint else {
        return Ok(Vec::new());
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for s in services {
        // The same rule as a model named in a request: the pool key is shared.
        let model = services::check_model(&s.model)
            .map_err(|_| Error::InvalidInput(format!("bad model name `{}`", s.model)))?;
        let model = model.as_str();
        if seen.insert((s.service, model.to_owned())) {
            out.push(PoolEntry {
                provision_id: p.id.clone(),
                provider_id: p.provider_id.clone(),
                service: s.service,
                model: model.to_owned(),
                endpoint: endpoint.clone(),
                node_secret: p.node_secret.clone(),
                tier: p.tier,
                region: p.location.country.clone(),
            });
        }
    }
    Ok(out)
}
