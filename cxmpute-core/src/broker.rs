//! The [`Broker`]: the whole request pipeline, implemented once.
//!
//! 1. **Authenticate** the API key (hashed, looked up by hash).
//! 2. **Admit**: validate the body, price its upper bounds, reserve that much
//!    of the user's credits and the key's limit in one atomic store write.
//! 3. **Select** a node from the in-memory pool index (no store read).
//! 4. **Forward** with connect, first-byte and idle timeouts; before the first
//!    byte reaches the client a failed node is marked and another is tried.
//! 5. **Stream** bytes through as they arrive, metering usage on the way.
//! 6. **Settle** in one atomic store write: charge the metered cost, release
//!    the rest, reward the provider, record usage. Failures cost nothing.
//! 7. **Record** statistics off the request path, in batches.
//!
//! ## What a request costs
//!
//! The reservation is the price of the request's upper bounds: its body's
//! bytes as input tokens (a token is at least one byte), `max_tokens` (or
//! `max_completion_tokens`, or the configured default, which is then sent to
//! the node) as output tokens. The charge is the price of what was metered,
//! never more than the reservation. Usage reported by a node is clamped to
//! those bounds; when a node reports none, the broker counts it (streamed
//! content chunks, or a quarter of the text's bytes).
//!
//! * Success: the full price of the metered usage; the provider earns what
//!   the [`RewardPolicy`] gives (at most the charge).
//! * Failure before the answer starts (every attempt failed, no node):
//!   nothing is charged and nothing rewarded.
//! * A stream cut by the node after the first byte: the stream ends with an
//!   explicit error event; the user pays for the input and the output tokens
//!   delivered, without the per-request fee; the provider earns nothing.
//! * The client going away mid-stream: the upstream call is cancelled; the
//!   user pays for what was delivered, including the per-request fee, and the
//!   provider earns its reward, since it did nothing wrong.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::accounts::{key_may_administer, normalize_email, AuthConfig, AuthState};
use crate::clock::{Clock, SystemClock};
use crate::egress::{self, CappedReadError, EgressPolicy};
use crate::error::{Error, Result};
use crate::health::{self, HealthConfig, HealthReport, Outcome};
use crate::mail::{ConsoleMailer, Mailer};
use crate::metrics::{AttemptOutcome, Metrics};
use crate::network::NetworkConfig;
use crate::pool::{Node, PoolIndex, RoutePreferences};
use crate::pricing::{default_prices, Meter, PriceTable};
use crate::reward::{FlatReward, RewardContext, RewardPolicy};
use crate::secret::Secret;
use crate::select::{PeakEwmaSelector, ProvisionSelector};
use crate::services::{self, AnswerKind, Prepared};
use crate::sse::ChatStreamMeter;
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
    /// Largest non-streamed answer accepted from a node.
    pub max_response_bytes: usize,
    /// Nodes tried per request before giving up.
    pub max_attempts: usize,
    /// TCP connect timeout to a node.
    pub connect_timeout: Duration,
    /// From sending the request to the node's first response bytes.
    pub first_byte_timeout: Duration,
    /// Longest silence between two chunks of an answer.
    pub idle_timeout: Duration,
    /// `max_tokens` sent to the node when the caller gave none (and reserved for).
    pub default_max_tokens: u32,
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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_body_bytes: 4 << 20,
            max_response_bytes: 32 << 20,
            max_attempts: 3,
            connect_timeout: Duration::from_secs(3),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            default_max_tokens: 4096,
            heartbeat_ttl: Duration::from_secs(90),
            reservation_ttl: Duration::from_secs(30 * 60),
            egress: EgressPolicy::PublicOnly,
            health: HealthConfig::default(),
            network: NetworkConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl BrokerConfig {
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
        let http = reqwest::Client::builder()
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
        let inner = Inner {
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
        };
        let broker = Broker {
            inner: Arc::new(inner),
        };
        broker.refresh_pools().await?;
        Ok(broker)
    }
}

struct Inner {
    auth: AuthState,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    selector: Arc<dyn ProvisionSelector>,
    rewards: Arc<dyn RewardPolicy>,
    mailer: Arc<dyn Mailer>,
    config: BrokerConfig,
    prices: PriceTable,
    pools: PoolIndex,
    stats: StatsRecorder,
    metrics: Metrics,
    http: reqwest::Client,
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

/// Why one attempt on one node failed.
#[derive(Debug)]
enum AttemptError {
    Timeout(String),
    Failed(String),
    /// The node said it is busy (429/503) and when to come back.
    Busy(String, Duration),
    /// The node refused the request itself (400/413/422 with an OpenAI error
    /// message): another node would refuse it too, so it is not retried.
    Rejected(String),
}

enum Answer {
    Complete(Bytes, Meter),
    Stream(Bytes, Box<StreamStart>),
}

impl Broker {
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

    /// Records one forwarded attempt that started at `t0`: its latency and
    /// success on the node's load, its outcome on the node's circuit breaker.
    fn attempt_done(&self, node: &Node, t0: Instant, outcome: Outcome) {
        node.observe(elapsed_us(t0), matches!(outcome, Outcome::Success));
        let i = &self.inner;
        let now = i.clock.now();
        if let Some(t) = health::record_forwarding(&i.config.health, &i.pools, node, now, outcome) {
            tracing::info!(provision = %node.entry.provision_id, transition = ?t, "circuit breaker");
            i.metrics.breaker_transition(match t {
                health::Transition::Opened(_) => health::BreakerState::Open,
                health::Transition::HalfOpened => health::BreakerState::HalfOpen,
                health::Transition::Closed => health::BreakerState::Closed,
            });
        }
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

    /// The API key for a bearer secret. `Unauthorized` for missing, unknown or revoked keys.
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
        if credit_limit.is_some_and(Credits::is_negative) {
            return Err(services::invalid("credit_limit must not be negative"));
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

    /// Adds (or removes) credits, recorded with who and why.
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
        self.inner.store.grant_credits(&grant).await
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
    pub async fn register_provision(
        &self,
        provider: &Provider,
        req: RegisterProvisionRequest,
    ) -> Result<RegisterProvisionResponse> {
        let device_len = serde_json::to_vec(&req.device)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if device_len > 64 * 1024 {
            return Err(services::invalid("device diagnostics larger than 64 KiB"));
        }
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
        self.inner
            .store
            .create_provision(&provision, &entries)
            .await?;
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

    /// Ends a provider's own node: it leaves every pool at once.
    pub async fn end_provision(&self, provider: &Provider, id: &ProvisionId) -> Result<()> {
        self.owned_provision(provider, id).await?;
        self.delete_provision(id).await
    }

    /// Deletes a node (`NotFound` if there is none) and takes it out of
    /// every pool at once.
    pub(crate) async fn delete_provision(&self, id: &ProvisionId) -> Result<()> {
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

    /// The models served now, with healthy node counts.
    pub fn models(&self) -> ModelList {
        let data = self
            .inner
            .pools
            .summary()
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

    // ---- the gateway pipeline --------------------------------------------------

    /// Runs one gateway call through the whole pipeline.
    pub async fn handle(&self, req: GatewayRequest) -> Result<GatewayResponse> {
        let started = Instant::now();
        // 1. Authenticate.
        let key = self.authenticate_key(req.api_key.as_ref()).await?;
        if !key.permits(req.route) {
            return Err(Error::Forbidden(format!(
                "this API key may not call {}",
                req.route
            )));
        }
        // 2. Admit: validate and price.
        if req.body.len() > self.inner.config.max_body_bytes {
            return Err(Error::PayloadTooLarge(format!(
                "request body is larger than {} bytes",
                self.inner.config.max_body_bytes
            )));
        }
        let prep = services::prepare(&self.inner.config, req.route, &req.body)?;
        tracing::Span::current().record("model", prep.model.as_str());
        if !self
            .inner
            .pools
            .is_offered(prep.route.service(), &prep.model)
        {
            return Err(Error::NotFound(format!("model `{}`", prep.model)));
        }
        let price = self.inner.prices.get(prep.route.service(), &prep.model);
        let amount = price.cost(prep.bound);
        let reservation = Reservation {
            request_id: RequestId::generate(),
            user_id: key.user_id.clone(),
            key_id: key.id.clone(),
            route: req.route,
            amount,
            created_at: self.now(),
        };
        self.inner.store.reserve(&reservation).await?;
        tracing::Span::current().record("request_id", reservation.request_id.as_str());
        let ctx = CallContext {
            broker: self.clone(),
            reservation,
            prep,
            price,
            app: req.app,
            preferences: req.preferences,
            started,
        };
        // 3-6.
        ctx.run().await
    }

    // ---- settle ----------------------------------------------------------------

    async fn settle(&self, r: &Reservation, st: Settlement) {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=5 {
            match self.inner.store.settle(&st).await {
                Ok(_) => {
                    // Stats see exactly what the store kept.
                    let u = crate::store_support::SettlePlan::new(r, &st).usage;
                    self.inner.stats.record(&u);
                    self.inner.metrics.settled(&u);
                    let outcome = if u.success { "success" } else { "failure" };
                    tracing::Span::current().record("outcome", outcome);
                    tracing::info!(
                        outcome,
                        latency_ms = u.latency_ms,
                        input_tokens = u.input_tokens,
                        output_tokens = u.output_tokens,
                        charged = u.charged.0,
                        "request settled"
                    );
                    return;
                }
                Err(e) if e.is_retryable() && attempt < 5 => {
                    tracing::warn!(error = %e, request = %st.request_id, "settle failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    // The reservation stays; the stale-reservation sweep releases it,
                    // so the user is never charged for an unrecorded request.
                    tracing::error!(error = %e, request = %st.request_id, "settle failed");
                    return;
                }
            }
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

/// One admitted request on its way through selection, forwarding and settling.
struct CallContext {
    broker: Broker,
    reservation: Reservation,
    prep: Prepared,
    price: Arc<PriceEntry>,
    app: Option<String>,
    preferences: RoutePreferences,
    started: Instant,
}

impl CallContext {
    async fn run(self) -> Result<GatewayResponse> {
        let b = self.broker.inner.clone();
        let mut tried: Vec<ProvisionId> = Vec::new();
        let mut last: Option<AttemptError> = None;
        for attempt in 1..=b.config.max_attempts {
            let Some(node) = b.pools.select_with(
                self.prep.route.service(),
                &self.prep.model,
                b.selector.as_ref(),
                &tried,
                &self.preferences,
            ) else {
                break;
            };
            tried.push(node.entry.provision_id.clone());
            if attempt > 1 {
                b.metrics.failover(self.reservation.route);
            }
            tracing::Span::current().record("node", node.entry.provision_id.as_str());
            tracing::Span::current().record("attempts", attempt);
            let span = tracing::debug_span!("attempt", attempt, node = %node.entry.provision_id);
            let t0 = Instant::now();
            let in_flight = node.start();
            let result = self.attempt(&node).instrument(span).await;
            b.metrics.attempt(
                self.prep.route.service(),
                match &result {
                    Ok(_) => AttemptOutcome::Success,
                    Err(AttemptError::Timeout(_)) => AttemptOutcome::Timeout,
                    Err(AttemptError::Busy(..)) => AttemptOutcome::Busy,
                    Err(AttemptError::Failed(_)) => AttemptOutcome::Failure,
                    // The node is fine; the request was not.
                    Err(AttemptError::Rejected(_)) => AttemptOutcome::Success,
                },
            );
            match result {
                Ok(Answer::Complete(body, meter)) => {
                    self.broker.attempt_done(&node, t0, Outcome::Success);
                    drop(in_flight);
                    let charged = self.price.cost(meter);
                    let st = self.settlement(Some(&node), meter, charged, true);
                    self.broker.settle(&self.reservation, st).await;
                    let content_type = "application/json".to_owned();
                    return Ok(GatewayResponse::Complete { content_type, body });
                }
                Ok(Answer::Stream(first, start)) => {
                    return Ok(self.stream(node, in_flight, t0, first, *start));
                }
                Err(AttemptError::Rejected(m)) => {
                    // Not the node's fault and not worth another node: the
                    // caller gets the node's reason as a 400 and pays nothing.
                    drop(in_flight);
                    let st = self.settlement(None, Meter::default(), Credits::ZERO, false);
                    self.broker.settle(&self.reservation, st).await;
                    return Err(Error::InvalidInput(format!(
                        "the node refused the request: {m}"
                    )));
                }
                Err(e) => {
                    tracing::warn!(node = %node.entry.provision_id, error = ?e, "node attempt failed");
                    let outcome = match &e {
                        AttemptError::Busy(_, d) => Outcome::Busy(*d),
                        _ => Outcome::Failure,
                    };
                    self.broker.attempt_done(&node, t0, outcome);
                    last = Some(e);
                }
            }
        }
        // Nothing reached the client: release the whole reservation.
        let st = self.settlement(None, Meter::default(), Credits::ZERO, false);
        self.broker.settle(&self.reservation, st).await;
        Err(match last {
            None => Error::NoCapacity(format!(
                "no healthy node serves `{}` right now",
                self.prep.model
            )),
            Some(AttemptError::Timeout(m)) => Error::UpstreamTimeout(m),
            Some(
                AttemptError::Failed(m) | AttemptError::Busy(m, _) | AttemptError::Rejected(m),
            ) => Error::Upstream(m),
        })
    }

    fn settlement(
        &self,
        node: Option<&Node>,
        meter: Meter,
        charged: Credits,
        success: bool,
    ) -> Settlement {
        let b = &self.broker.inner;
        let latency_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let reward = match node {
            // Only a successful request earns its node a reward.
            Some(n) if success => {
                let ctx = RewardContext {
                    service: self.prep.route.service(),
                    model: &self.prep.model,
                    tier: n.entry.tier,
                    meter,
                    latency_ms,
                    charged,
                };
                Some((n.entry.provider_id.clone(), b.rewards.reward(&ctx)))
            }
            _ => None,
        };
        let r = &self.reservation;
        Settlement {
            request_id: r.request_id.clone(),
            charged,
            reward,
            usage: UsageRecord {
                request_id: r.request_id.clone(),
                user_id: r.user_id.clone(),
                key_id: r.key_id.clone(),
                route: r.route,
                model: self.prep.model.clone(),
                provision_id: node.map(|n| n.entry.provision_id.clone()),
                provider_id: node.map(|n| n.entry.provider_id.clone()),
                input_tokens: meter.input_tokens,
                output_tokens: meter.output_tokens,
                units: meter.units,
                success,
                latency_ms,
                app: self.app.clone(),
                at: b.clock.now(),
                charged: Credits::ZERO,
                reward: Credits::ZERO,
            },
        }
    }

    /// One try on one node, up to the point where the client could see bytes.
    async fn attempt(&self, node: &Node) -> std::result::Result<Answer, AttemptError> {
        let cfg = &self.broker.inner.config;
        let url = format!("{}{}", node.entry.endpoint, self.prep.route.path());
        let send = self
            .broker
            .inner
            .http
            .post(url)
            .bearer_auth(&node.entry.node_secret)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(self.prep.body.clone())
            .send();
        let mut resp = match tokio::time::timeout(cfg.first_byte_timeout, send).await {
            Err(_) => return Err(AttemptError::Timeout("node did not answer in time".into())),
            Ok(Err(e)) if e.is_timeout() => {
                return Err(AttemptError::Timeout(format!("node timed out: {e}")))
            }
            Ok(Err(e)) => return Err(AttemptError::Failed(format!("node unreachable: {e}"))),
            Ok(Ok(r)) => r,
        };
        if matches!(resp.status().as_u16(), 400 | 413 | 422) {
            if let Some(m) = rejection_message(resp).await {
                return Err(AttemptError::Rejected(m));
            }
            return Err(AttemptError::Failed(
                "node refused the request without saying why".into(),
            ));
        }
        if !resp.status().is_success() {
            let msg = format!("node answered {}", resp.status());
            let now = self.broker.now();
            return Err(match health::classify(resp.status(), resp.headers(), now) {
                Outcome::Busy(d) => AttemptError::Busy(msg, d),
                _ => AttemptError::Failed(msg),
            });
        }
        let mut stream_meter = match self.prep.kind {
            AnswerKind::ChatSse {
                caller_wants_usage: true,
            } => Some(ChatStreamMeter::default()),
            AnswerKind::ChatSse {
                caller_wants_usage: false,
            } => Some(ChatStreamMeter::without_usage_chunk()),
            AnswerKind::Binary => None,
            AnswerKind::Json(meter_json) => {
                let buf = read_capped(&mut resp, cfg.idle_timeout, cfg.max_response_bytes).await?;
                let meter = meter_json(&self.prep, &buf).map_err(AttemptError::Failed)?;
                return Ok(Answer::Complete(Bytes::from(buf), meter));
            }
        };
        // A stream: wait for its first bytes before answering the client, so
        // that a node failing now can still be replaced by another.
        let mut first = match tokio::time::timeout(cfg.first_byte_timeout, resp.chunk()).await {
            Err(_) => return Err(AttemptError::Timeout("node sent no bytes in time".into())),
            Ok(Err(e)) => return Err(AttemptError::Failed(format!("node stream failed: {e}"))),
            Ok(Ok(None)) => return Err(AttemptError::Failed("node sent an empty answer".into())),
            Ok(Ok(Some(c))) => c,
        };
        let content_type = match &stream_meter {
            Some(_) => "text/event-stream".to_owned(),
            None => binary_content_type(&resp),
        };
        if let Some(m) = stream_meter.as_mut() {
            first = m.pass(first);
            if m.garbage {
                return Err(AttemptError::Failed(
                    "node sent something that is not a chat stream".into(),
                ));
            }
        }
        Ok(Answer::Stream(
            first,
            Box::new(StreamStart {
                resp,
                meter: stream_meter,
                content_type,
            }),
        ))
    }

    /// Passes a stream through from its first chunk on, and settles when it ends.
    fn stream(
        self,
        node: Arc<Node>,
        in_flight: crate::pool::InFlight,
        t0: Instant,
        first: Bytes,
        start: StreamStart,
    ) -> GatewayResponse {
        let StreamStart {
            mut resp,
            mut meter,
            content_type,
        } = start;
        let (tx, rx) = mpsc::channel::<std::result::Result<Bytes, std::io::Error>>(16);
        let idle = self.broker.inner.config.idle_timeout;
        let task = async move {
            let _in_flight = in_flight;
            enum End {
                Done,
                ClientGone,
                NodeFailed(String),
            }
            let mut end = if !first.is_empty() && tx.send(Ok(first)).await.is_err() {
                Some(End::ClientGone)
            } else {
                None
            };
            while end.is_none() {
                let next = tokio::select! {
                    r = tokio::time::timeout(idle, resp.chunk()) => r,
                    _ = tx.closed() => { end = Some(End::ClientGone); break; }
                };
                match next {
                    Err(_) => end = Some(End::NodeFailed("node stalled mid-stream".into())),
                    Ok(Err(e)) => end = Some(End::NodeFailed(format!("node stream failed: {e}"))),
                    Ok(Ok(None)) => {
                        let complete = match meter.as_mut() {
                            Some(m) => {
                                m.finish();
                                let rest = m.take_output();
                                if !rest.is_empty() {
                                    let _ = tx.send(Ok(rest)).await;
                                }
                                m.done && !m.garbage
                            }
                            None => true,
                        };
                        end = Some(if complete {
                            End::Done
                        } else {
                            End::NodeFailed("node ended the stream early".into())
                        });
                    }
                    Ok(Ok(Some(chunk))) => {
                        let chunk = match meter.as_mut() {
                            Some(m) => m.pass(chunk),
                            None => chunk,
                        };
                        // An empty chunk would end a chunked body early.
                        if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                            end = Some(End::ClientGone);
                        } else if meter.as_ref().is_some_and(|m| m.garbage) {
                            end = Some(End::NodeFailed("node sent garbage mid-stream".into()));
                        }
                    }
                }
            }
            // Dropping the response cancels the upstream call.
            drop(resp);
            // A binary answer (audio) is metered by the request's bounds
            // (characters to speak), known before it started.
            let m = match &meter {
                Some(m) => m.meter(self.prep.fallback_input, self.prep.bound),
                None => self.prep.bound,
            };
            let st = match end {
                Some(End::NodeFailed(reason)) => {
                    self.broker.attempt_done(&node, t0, Outcome::Failure);
                    let charged = match meter {
                        Some(_) => {
                            let event = serde_json::json!({"error": {
                                "message": format!("the stream was interrupted: {reason}"),
                                "type": "upstream_error",
                                "code": "stream_interrupted",
                            }});
                            let _ = tx.send(Ok(Bytes::from(format!("data: {event}\n\n")))).await;
                            self.price.partial_cost(m)
                        }
                        None => {
                            // Audio cannot carry an error event: break the
                            // body so the client sees a truncated transfer,
                            // and charge nothing for unusable audio.
                            let _ = tx.send(Err(std::io::Error::other(reason))).await;
                            Credits::ZERO
                        }
                    };
                    self.settlement(Some(&node), m, charged, false)
                }
                Some(End::ClientGone) | Some(End::Done) | None => {
                    self.broker.attempt_done(&node, t0, Outcome::Success);
                    let charged = self.price.cost(m);
                    self.settlement(Some(&node), m, charged, true)
                }
            };
            // Settle before the body ends: a client that has read the whole
            // answer can rely on it being charged and recorded.
            self.broker.settle(&self.reservation, st).await;
            drop(tx);
        };
        // The stream outlives the handler: it keeps the request's span.
        tokio::spawn(task.instrument(tracing::Span::current()));
        GatewayResponse::Stream {
            content_type,
            body: tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        }
    }
}

/// What a streamed answer needs after its first chunk.
struct StreamStart {
    resp: reqwest::Response,
    /// The chat stream meter; `None` for opaque (binary) answers.
    meter: Option<ChatStreamMeter>,
    content_type: String,
}

/// The content type of a binary answer: the node's, when it is audio or
/// octet-stream (never anything a browser would render), else `audio/wav`.
fn binary_content_type(resp: &reqwest::Response) -> String {
    let ct = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if (ct.starts_with("audio/") || ct == "application/octet-stream")
        && ct.chars().all(|c| c.is_ascii_graphic() || c == ' ')
    {
        ct
    } else {
        "audio/wav".to_owned()
    }
}

/// The message of a node's OpenAI-style error answer (`{"error":{"message":..}}`),
/// read with a small cap and cleaned for display; `None` when there is none.
async fn rejection_message(mut resp: reqwest::Response) -> Option<String> {
    let buf = read_capped(&mut resp, Duration::from_secs(5), 16 * 1024)
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&buf).ok()?;
    let m = v.pointer("/error/message")?.as_str()?;
    let clean: String = m.chars().filter(|c| !c.is_control()).take(300).collect();
    (!clean.trim().is_empty()).then_some(clean)
}

/// A node's whole answer, at most `cap` bytes, each read within `idle`.
async fn read_capped(
    resp: &mut reqwest::Response,
    idle: Duration,
    cap: usize,
) -> std::result::Result<Vec<u8>, AttemptError> {
    egress::read_capped(resp, cap, Some(idle))
        .await
        .map_err(|e| match e {
            CappedReadError::Stalled => AttemptError::Timeout("node stalled mid-answer".into()),
            CappedReadError::Failed(e) => AttemptError::Failed(format!("node answer failed: {e}")),
            CappedReadError::TooLarge => AttemptError::Failed("node answer too large".into()),
        })
}

fn elapsed_us(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}
