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
//! 6. **Settle** atomically (a call held in memory or in a credit lease in
//!    a group commit with the calls settling at the same time): charge the
//!    metered cost, release the rest, reward the provider, record usage.
//!    Failures cost nothing. The answer (a stream's
//!    end) goes out only once its settlement committed: an answered call is
//!    a charged call.
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

use crate::admission::Admission;
use crate::clock::{Clock, SystemClock};
use crate::egress::{self, EgressPolicy, EgressRules};
use crate::error::{Error, Result};
use crate::health::{self, HealthConfig, HealthReport};
use crate::keycache::KeyCache;
use crate::mail::{ConsoleMailer, Mailer};
use crate::metrics::Metrics;
use crate::network::NetworkConfig;
use crate::pool::PoolIndex;
pub use crate::pool::{ListedPools, RoutePreferences};
use crate::pricing::{default_prices, PriceTable};
use crate::ratelimit::RateLimiter;
use crate::reward::{PlatformShare, RewardPolicy};
use crate::secret::Secret;
use crate::select::{PeakEwmaSelector, ProvisionSelector};
use crate::sessions::{AuthConfig, AuthState};
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
    /// Canary calls, node reputation and quarantine (see [`crate::verify`]).
    pub verify: crate::verify::VerifyConfig,
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
    /// Whether hosts sharing a store admit calls from credit leases (default
    /// on): part of an account's balance (and its key's limit) reserved for
    /// this host, from which calls are held in memory and settled in
    /// batches, instead of a reservation and a settlement in the store per
    /// call (see `docs/ARCHITECTURE.md`, "Admission"). Off, every call
    /// reserves in the store. A store one host owns admits from memory
    /// either way.
    pub credit_leases: bool,
    /// An account and key with no call for this long hands its credit
    /// leases back on the next maintenance tick (default 5 s), so that other
    /// hosts can spend what they held.
    pub lease_idle: Duration,
    /// The most pools or models a public list names (default 100):
    /// `GET /v1/models`, the pool and model lists of `GET /v1/stats/network`
    /// and the per-pool series of `GET /metrics`. Anyone may register nodes
    /// serving any names, so these lists name the catalogue's pools first,
    /// then the largest (the busiest, for models by traffic), and count the
    /// rest without naming them.
    pub public_list_limit: usize,
    /// Every account's rate limits over all its keys together: requests and
    /// tokens per minute (default none). A key's own limits
    /// ([`ApiKey::rate_limits`], set by its owner or an admin) apply too; a
    /// call must fit both. See `docs/ARCHITECTURE.md`, "Rate limits".
    pub account_rate_limits: RateLimits,
    /// The response cache: its size in bytes, longest time to live and
    /// price (see [`crate::cache`]).
    pub cache: crate::cache::CacheConfig,
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
            verify: Default::default(),
            key_cache_capacity: 100_000,
            key_cache_ttl: Duration::from_secs(1),
            account_capacity: 100_000,
            credit_leases: true,
            lease_idle: Duration::from_secs(5),
            public_list_limit: 100,
            account_rate_limits: RateLimits::NONE,
            cache: Default::default(),
        }
    }
}

impl BrokerConfig {
    /// Refuses settings that would break the money rules: a call must always
    /// settle before the stale-reservation sweep could release its hold.
    fn check(&self) -> Result<()> {
        let longest = self.longest_call();
        if longest >= self.reservation_ttl {
            return Err(Error::InvalidInput(format!(
                "a call may last {longest:?} (first-byte timeouts, stream duration, send \
                 timeout), not below reservation_ttl ({:?})",
                self.reservation_ttl
            )));
        }
        self.verify.check()?;
        self.cache.check()?;
        if self.max_attempts == 0 {
            return Err(Error::InvalidInput(
                "max_attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The longest a gateway call may last: first-byte timeouts, stream
    /// duration, send timeout.
    fn longest_call(&self) -> Duration {
        let attempts = u32::try_from(self.max_attempts).unwrap_or(u32::MAX);
        self.first_byte_timeout
            .saturating_mul(attempts.saturating_add(1))
            .saturating_add(self.max_stream_duration)
            .saturating_add(self.client_send_timeout)
            .saturating_add(self.idle_timeout)
    }

    /// How credit leases are kept, when they are on. A lease admits calls
    /// only as long as each can still settle before the stale sweep could
    /// take it: the reservation TTL less the longest call, less a minute
    /// (at most half the difference) for the settlement's own tries.
    fn leases(&self) -> Option<crate::admission::LeaseConfig> {
        let slack = self.reservation_ttl.saturating_sub(self.longest_call());
        let renew_after = slack.saturating_sub((slack / 2).min(Duration::from_secs(60)));
        self.credit_leases.then_some(crate::admission::LeaseConfig {
            idle: self.lease_idle,
            renew_after,
        })
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

    /// Sets the reward policy (default: [`PlatformShare`], the platform
    /// keeping 20 % of every charge).
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
        let forward =
            crate::forward::NodeClient::new(self.config.egress, self.config.connect_timeout)?;
        let auth = AuthState::new(&self.config.auth)?;
        let (capacity, ttl) = (self.config.key_cache_capacity, self.config.key_cache_ttl);
        let inner = Inner {
            keys: KeyCache::new(self.store.clone(), self.clock.clone(), capacity, ttl),
            admission: Admission::new(
                self.store.clone(),
                self.config.account_capacity,
                self.clock.clone(),
                self.config.leases(),
            ),
            limits: RateLimiter::new(
                self.store.clone(),
                self.clock.clone(),
                self.config.account_rate_limits,
            ),
            budgets: crate::budget::Budgets::new(
                self.store.clone(),
                self.clock.clone(),
                crate::alerts::Alerter::new(
                    self.store.clone(),
                    self.clock.clone(),
                    self.mailer.clone(),
                    ttl,
                ),
            ),
            cache: crate::cache::ResponseCache::new(&self.config.cache, self.clock.clone()),
            auth,
            // Stored prices are applied over these by the refresh below.
            prices: PriceTable::new(self.default_prices, Vec::new()),
            // The store's catalogue replaces this one in the refresh below.
            catalogue: crate::catalogue::CatalogueState::new(&self.config.network.catalogue),
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
            forward,
            usual: Default::default(),
            verify: Default::default(),
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
    /// Requests and tokens per minute (see [`crate::ratelimit`]).
    pub(crate) limits: RateLimiter,
    /// Spending per day or month (see [`crate::budget`]).
    pub(crate) budgets: crate::budget::Budgets,
    /// Answers kept for repeated calls (see [`crate::cache`]).
    pub(crate) cache: crate::cache::ResponseCache,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) selector: Arc<dyn ProvisionSelector>,
    pub(crate) rewards: Arc<dyn RewardPolicy>,
    pub(crate) mailer: Arc<dyn Mailer>,
    pub(crate) config: BrokerConfig,
    pub(crate) prices: PriceTable,
    /// The catalogue in force: the store's, or the built-in one when the
    /// store holds none (see [`crate::catalogue`]).
    pub(crate) catalogue: crate::catalogue::CatalogueState,
    pub(crate) pools: PoolIndex,
    pub(crate) stats: StatsRecorder,
    pub(crate) metrics: Metrics,
    pub(crate) http: reqwest::Client,
    /// What calls are forwarded to nodes with (see [`crate::forward`]).
    pub(crate) forward: crate::forward::NodeClient,
    /// How long each pool usually takes to answer (adaptive timeouts, hedging).
    pub(crate) usual: crate::gateway::UsualDurations,
    /// Nodes' reputations and the canary account (see [`crate::verify`]).
    pub(crate) verify: crate::verify::Verifier,
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
    /// What the call asks of the response cache (`X-Cxmpute-Cache`); `None`
    /// follows the key's default.
    pub cache: Option<CacheDirective>,
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
            cache: None,
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
            rewards: Arc::new(PlatformShare::default()),
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

    /// Keys and revocations of sessions (see [`crate::sessions`]).
    pub(crate) fn auth_state(&self) -> &AuthState {
        &self.inner.auth
    }

    /// The routing index. Only the broker's own operations change it, each
    /// after the store agreed: embedders read it through
    /// [`Broker::listed_pools`], [`Broker::models`] and
    /// [`crate::network::Network::node_status`].
    pub(crate) fn pools(&self) -> &PoolIndex {
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

    /// The prices in use (to change one: [`crate::admin::Admin::put_price`]).
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
    /// The catalogue and prices are reloaded too, so a change made through
    /// one host reaches the others on their next refresh; a node's entries
    /// for models the catalogue no longer offers it (removed, or above its
    /// tier) are left out of routing.
    pub async fn refresh_pools(&self) -> Result<()> {
        let catalogue = self.load_catalogue().await?;
        // One lookup per entry, not a scan of the catalogue: both may be large.
        let min_tier: std::collections::HashMap<(Service, &str), u8> = (catalogue.models().iter())
            .map(|m| ((m.service, m.model.as_str()), m.min_tier))
            .collect();
        let mut entries = self.inner.store.pool_entries().await?;
        entries.retain(|e| {
            (min_tier.get(&(e.service, e.model.as_str()))).is_some_and(|t| *t <= e.tier)
        });
        self.inner.pools.rebuild(entries);
        for price in self.inner.store.prices().await? {
            self.inner.prices.set(price);
        }
        Ok(())
    }

    /// One round of housekeeping: expire silent nodes, hand back idle credit
    /// leases, release stale reservations, delete spent sign-in codes and expired refresh tokens,
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
        // Idle leases go back first, so the sweep finds only dead hosts'.
        self.inner.admission.upkeep(false).await;
        self.inner.limits.upkeep();
        self.inner
            .store
            .release_stale_reservations(now.minus(self.inner.config.reservation_ttl))
            .await?;
        self.sessions().prune().await?;
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
    /// `every`, [`Broker::run_health_checks`] every
    /// [`HealthConfig::probe_interval`] and [`Broker::run_canaries`] every
    /// [`crate::verify::VerifyConfig::interval`], until the returned handle
    /// is aborted.
    pub fn spawn_maintenance(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let b = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // `interval` panics on zero; probing faster than this helps nobody.
            let probe_every = b.inner.config.health.probe_interval;
            let mut probe = tokio::time::interval(probe_every.max(Duration::from_millis(100)));
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first round after one interval: a host starting has nothing to compare yet.
            let canary_every = b.inner.config.verify.interval;
            let every_canary = canary_every
                .unwrap_or(Duration::MAX / 4)
                .max(Duration::from_secs(1));
            let mut canary =
                tokio::time::interval_at(tokio::time::Instant::now() + every_canary, every_canary);
            canary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = probe.tick() => {
                        b.run_health_checks().await;
                        continue;
                    }
                    _ = canary.tick(), if canary_every.is_some() => {
                        if let Err(e) = b.run_canaries().await {
                            tracing::warn!(error = %e, "canary round failed; will retry");
                        }
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

    // ---- what routing offers now --------------------------------------------------

    /// The pools public lists name: at most
    /// [`BrokerConfig::public_list_limit`], the catalogue's first, then the
    /// largest.
    pub fn listed_pools(&self) -> ListedPools {
        let current = self.catalogue();
        let catalogue: std::collections::HashSet<(Service, &str)> = current
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
    ///
    /// Then the aliases, marked `owned_by: "cxmpute-alias"` with their
    /// `models`: under the service of their first catalogue model, counting
    /// the healthy nodes of all their models.
    pub fn models(&self) -> ModelList {
        let mut data: Vec<ModelInfo> = self
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
                models: Vec::new(),
            })
            .collect();
        let catalogue = self.catalogue();
        for (alias, models) in self.aliases().iter() {
            let service = (models.iter())
                .find_map(|m| catalogue.models().iter().find(|c| c.model == *m))
                .map_or(Service::Chat, |c| c.service);
            data.push(ModelInfo {
                id: alias.clone(),
                object: "model".into(),
                created: 0,
                owned_by: "cxmpute-alias".into(),
                service,
                nodes: (models.iter())
                    .map(|m| self.inner.pools.pool_size(service, m))
                    .sum(),
                models: models.clone(),
            });
        }
        ModelList {
            object: "list".into(),
            data,
        }
    }
}
