//! The gateway pipeline: from an authenticated call to a settled answer.
//!
//! What it does, what a request costs and how nodes are bounded is written
//! once, in the [`crate::broker`] module docs. Here: an attempt has two
//! phases. The first (send, until the response headers) is raced: it is
//! cheap to repeat, since nothing reached the caller, so a slow one is
//! hedged on another node and the losers are judged in the background. The
//! second (the whole JSON answer, or a stream's first chunk) is not raced;
//! a failure there moves on to another node. When no node of the model is
//! left to try, a call naming several models (a `models` list, an alias)
//! moves on to the next one; see `docs/ARCHITECTURE.md`, "Fallbacks and
//! aliases".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use parking_lot::RwLock;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::admission::Hold;
use crate::broker::{Broker, GatewayRequest, GatewayResponse};
use crate::budget::BudgetTicket;
use crate::cache::{self, Lookup};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::forward::{self, NodeResponse, ReadError};
use crate::health::{self, Outcome};
use crate::metrics::AttemptOutcome;
use crate::pool::{InFlight, Node, RoutePreferences};
use crate::pricing::{Cost, Meter};
use crate::ratelimit::{RateStatus, Ticket};
use crate::reward::RewardContext;
use crate::services::{self, AnswerKind, Prepared};
use crate::sse::ChatStreamMeter;
use crate::types::*;

/// What the caller is told when a node refused its request. Never the node's
/// own words: a stranger's node could make them say anything.
const REFUSED: &str = "the model server refused this request (for example: the input is too \
                       long for the model, an image could not be fetched, or a parameter is \
                       not supported)";

/// What the caller is told when its call's charge could not be committed:
/// the answer (or a stream's end) is withheld, and nothing was charged.
const NOT_CHARGED: &str = "the answer could not be recorded, so it was withheld and nothing was \
                           charged; try again shortly";

/// The tokens a tokens-per-minute limit counts of a call: input and output.
fn bound_tokens(m: Meter) -> u64 {
    m.input_tokens.saturating_add(m.output_tokens)
}

/// The phases of an attempt whose usual duration is tracked per pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Until a non-streamed call's response headers (the whole generation).
    Headers,
    /// Until a streamed call's response headers (before prefill on most servers).
    StreamHeaders,
    /// From a stream's headers to its first chunk (prefill).
    FirstChunk,
}

/// How long one phase usually takes in one pool: an EWMA (weight 1/8) of
/// the durations of successes, in microseconds; 0 until the first.
#[derive(Debug, Default)]
pub(crate) struct Usual(AtomicU64);

impl Usual {
    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn observe(&self, d: Duration) {
        let sample = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    (old.saturating_mul(7).saturating_add(sample) / 8).max(1)
                })
            });
    }
}

/// The usual phase durations of every pool, created on first use. Keyed
/// by phase and service first, so a lookup borrows the request's model name
/// instead of allocating a key.
#[derive(Debug, Default)]
pub(crate) struct UsualDurations(RwLock<HashMap<(Service, Phase), UsualByModel>>);

/// One phase's usual durations in one service's pools, by model.
type UsualByModel = HashMap<String, Arc<Usual>>;

impl UsualDurations {
    fn of(&self, service: Service, model: &str, phase: Phase) -> Arc<Usual> {
        if let Some(u) = self
            .0
            .read()
            .get(&(service, phase))
            .and_then(|m| m.get(model))
        {
            return u.clone();
        }
        let mut map = self.0.write();
        let models = map.entry((service, phase)).or_default();
        models.entry(model.to_owned()).or_default().clone()
    }

    /// Forgets pools no node serves any more (called from maintenance), so
    /// the table is as bounded as the routing index.
    pub(crate) fn retain(&self, mut live: impl FnMut(Service, &str) -> bool) {
        let mut map = self.0.write();
        for ((service, _), models) in map.iter_mut() {
            models.retain(|m, _| live(*service, m));
        }
        map.retain(|_, models| !models.is_empty());
    }
}

/// How often a waiting attempt looks again at what its pool usually takes,
/// while the pool has no measurement yet (once it has one, the waits are
/// computed when they fall due).
const RECHECK: Duration = Duration::from_millis(50);

/// The bounds of an adaptive wait (see [`Waits::timeout`]).
#[derive(Clone, Copy, Debug)]
struct Waits {
    multiple: u32,
    floor: Duration,
    ceiling: Duration,
}

impl Waits {
    /// The broker's adaptive-wait settings under `ceiling`.
    fn under(cfg: &crate::broker::BrokerConfig, ceiling: Duration) -> Self {
        Waits {
            multiple: cfg.adaptive_timeout_multiple,
            floor: cfg.adaptive_timeout_floor,
            ceiling,
        }
    }

    /// The wait allowed for a phase: `multiple` × usual, within
    /// `[floor, ceiling]` (the ceiling alone while the pool has no measurement).
    fn timeout(self, usual: Option<Duration>) -> Duration {
        match usual {
            Some(u) => u
                .saturating_mul(self.multiple)
                .max(self.floor)
                .min(self.ceiling),
            None => self.ceiling,
        }
    }
}

/// Why one attempt on one node failed. `public` is what a caller may read
/// (fixed text: never a node's words or address); `detail` goes to the log.
#[derive(Debug)]
struct AttemptError {
    kind: Failure,
    public: &'static str,
    detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    Failed,
    /// The node said it is busy (429/503) and when to come back.
    Busy(Duration),
    /// The node refused the request itself (400/413/422 with a message).
    Refused,
}

impl AttemptError {
    fn new(kind: Failure, public: &'static str, detail: impl Into<String>) -> Self {
        AttemptError {
            kind,
            public,
            detail: detail.into(),
        }
    }

    fn timeout(public: &'static str) -> Self {
        Self::new(Failure::Timeout, public, public)
    }

    fn failed(public: &'static str) -> Self {
        Self::new(Failure::Failed, public, public)
    }

    /// The outcome the node's breaker and latency see.
    fn outcome(&self) -> Outcome {
        match self.kind {
            Failure::Timeout => Outcome::Timeout,
            Failure::Busy(d) => Outcome::Busy(d),
            Failure::Failed | Failure::Refused => Outcome::Failure,
        }
    }

    fn metric(&self) -> AttemptOutcome {
        match self.kind {
            Failure::Timeout => AttemptOutcome::Timeout,
            Failure::Busy(_) => AttemptOutcome::Busy,
            Failure::Failed => AttemptOutcome::Failure,
            Failure::Refused => AttemptOutcome::Refused,
        }
    }
}

/// The first phase of one attempt, as it ended.
struct Raced {
    node: Arc<Node>,
    in_flight: InFlight,
    t0: Instant,
    result: std::result::Result<NodeResponse, AttemptError>,
}

enum Answer {
    Complete(Bytes, Meter),
    Stream(Bytes, Box<StreamStart>),
}

/// What a streamed answer needs after its first chunk.
struct StreamStart {
    resp: NodeResponse,
    /// The chat stream meter; `None` for opaque (binary) answers.
    meter: Option<ChatStreamMeter>,
    content_type: String,
}

impl Broker {
    /// Runs one gateway call through the whole pipeline.
    ///
    /// The call runs in a task of its own, so a caller that hangs up does
    /// not cancel it half-way: a non-streamed call runs to its end on the
    /// node and is settled as answered (the node did the work it was asked
    /// for, as OpenAI charges a completion whose client went away); a
    /// stream is settled for what was passed on before the caller left.
    /// Nothing is ever left held for the stale-reservation sweep.
    pub async fn handle(&self, req: GatewayRequest) -> Result<GatewayResponse> {
        self.handle_limited(req).await.0
    }

    /// [`Broker::handle`], with the rate limits the answer reports (its
    /// `x-ratelimit-*` headers; empty before the caller is known) and, for
    /// a call that used the response cache, whether it was a hit.
    pub(crate) async fn handle_limited(
        &self,
        req: GatewayRequest,
    ) -> (Result<GatewayResponse>, RateStatus, Option<Lookup>) {
        let broker = self.clone();
        let task = async move {
            let mut rate = RateStatus::default();
            let mut lookup = None;
            let answer = broker.admit_and_run(req, &mut rate, &mut lookup).await;
            (answer, rate, lookup)
        };
        match spawn_outliving(task).await {
            Ok(done) => done,
            Err(e) => (
                Err(Error::backend("the gateway call's task failed", e)),
                RateStatus::default(),
                None,
            ),
        }
    }

    async fn admit_and_run(
        &self,
        req: GatewayRequest,
        rate: &mut RateStatus,
        lookup: &mut Option<Lookup>,
    ) -> Result<GatewayResponse> {
        let started = Instant::now();
        let i = self.inner();
        // 1. Authenticate, from memory for a key seen lately.
        let known = i.keys.get(req.api_key.as_ref()).await?;
        if known.suspended {
            return Err(Error::Forbidden("account suspended".into()));
        }
        let key = &known.key;
        let limited = i.limits.applies(key);
        if limited {
            *rate = i.limits.status(key);
        }
        if !key.permits(req.route) {
            return Err(Error::Forbidden(format!(
                "this API key may not call {}",
                req.route
            )));
        }
        // 2. Admit: validate and price.
        if req.body.len() > i.config.max_body_bytes {
            return Err(Error::PayloadTooLarge(format!(
                "request body is larger than {} bytes",
                i.config.max_body_bytes
            )));
        }
        let mut prep = services::prepare(&i.config, req.route, &req.body)?;
        let service = prep.route.service();
        let requested = prep.model.clone();
        // The cache keys the request as written: an alias or a `models`
        // list is part of it, whichever model ends up serving.
        let cache = cache::Plan::of(
            &i.config.cache,
            req.cache,
            key,
            req.route,
            &requested,
            &req.body,
        )?;
        let models = self.resolve_models(service, &prep.models)?;
        if models.len() == 1 && !i.pools.is_offered(service, &models[0]) {
            return Err(Error::ModelNotFound(models[0].clone()));
        }
        if models[0] != prep.model {
            // An alias: the node is told the model it serves.
            prep.body = services::with_model(&prep.body, &models[0])?;
            prep.model = models[0].clone();
        }
        tracing::Span::current().record("model", prep.model.as_str());
        // Each model at its own price; the reservation covers the dearest,
        // whichever ends up serving.
        let mut fallbacks: Vec<(String, Arc<PriceEntry>)> = (models.into_iter())
            .map(|m| {
                let p = i.prices.get(service, &m);
                (m, p)
            })
            .collect();
        let amount = (fallbacks.iter())
            .map(|(_, p)| p.cost(prep.bound))
            .max()
            .unwrap_or(Credits::ZERO);
        let price = fallbacks.remove(0).1;
        let fallbacks: std::collections::VecDeque<_> = fallbacks.into();
        let reservation = Reservation {
            request_id: RequestId::generate(),
            user_id: key.user_id.clone(),
            key_id: key.id.clone(),
            route: req.route,
            amount,
            created_at: self.now(),
        };
        // Requests and tokens per minute: from memory (see `ratelimit`).
        let ticket = if limited {
            (i.limits.admit(key, bound_tokens(prep.bound), rate)).await?
        } else {
            Ticket::default()
        };
        // The key's and account's spending per day or month: in the store
        // (see `budget`).
        let budget = match i.budgets.admit(&known, amount).await {
            Ok(budget) => budget,
            Err(e) => {
                ticket.cancel();
                if limited {
                    *rate = i.limits.status(key);
                }
                return Err(e);
            }
        };
        // In the store, or in memory when this host owns the store.
        let hold = match i.admission.hold(reservation, key).await {
            Ok(hold) => hold,
            Err(e) => {
                ticket.cancel();
                budget.cancel().await;
                if limited {
                    *rate = i.limits.status(key);
                }
                return Err(e);
            }
        };
        let request_id = hold.reservation().request_id.as_str();
        tracing::Span::current().record("request_id", request_id);
        let ctx = CallContext {
            broker: self.clone(),
            hold,
            rate: ticket,
            budget,
            prep,
            price,
            fallbacks,
            requested,
            app: req.app,
            preferences: req.preferences,
            started,
            cache,
        };
        // Looked up once admitted: a hit is held, limited and budgeted as
        // any call, and settled at the cache price.
        if let Some(plan) = &ctx.cache {
            let found = i.cache.get(plan);
            *lookup = Some(if found.is_some() {
                Lookup::Hit
            } else {
                Lookup::Miss
            });
            if let Some(entry) = found {
                return ctx.answer_from_cache(entry).await;
            }
        }
        // 3-6.
        ctx.run().await
    }

    /// Settles a call, retrying what may succeed later, then ends its hold.
    /// `Ok` once the store committed it; otherwise the call must not be
    /// answered (an answered call is a charged call), and the error says so.
    async fn settle(&self, hold: &Hold, st: Settlement) -> Result<()> {
        let committed = self.persist_settlement(hold, &st).await;
        hold.finish(committed);
        match committed {
            Some(_) => Ok(()),
            None => Err(Error::NotCharged(NOT_CHARGED.to_owned())),
        }
    }

    /// Persists a settlement, retrying what may succeed later: the charge
    /// the store committed, or `None` when it is not known to be ours.
    async fn persist_settlement(&self, hold: &Hold, st: &Settlement) -> Option<Credits> {
        let i = self.inner();
        let mut delay = Duration::from_millis(50);
        let plan = crate::store_support::SettlePlan::new(hold.reservation(), st);
        for attempt in 1..=5 {
            let applied = match i.admission.settle(hold, st).await {
                Ok(SettleOutcome::Applied) => Ok(true),
                // Settled before: by an earlier try of ours whose answer was
                // lost (then the stored record is ours), or by someone else,
                // such as the stale-reservation sweep (then it is not, and
                // statistics must not count what the store did not keep).
                Ok(SettleOutcome::AlreadySettled) if !hold.reserved_in_store() => {
                    // Only this call's settlement writes its id (no
                    // reservation of it exists to be swept): ours.
                    Ok(true)
                }
                Ok(SettleOutcome::AlreadySettled) => {
                    let kept = i.store.settlement(&st.request_id).await;
                    Ok(kept.is_ok_and(|k| same_settlement(&k, &plan.usage)))
                }
                Err(e) => Err(e),
            };
            match applied {
                Ok(true) => {
                    // Stats see exactly what the store kept.
                    let u = &plan.usage;
                    if i.verify.is_canary(&u.user_id) {
                        // The platform's canaries are no user's traffic.
                        i.stats.record_canary(u);
                    } else {
                        i.stats.record(u);
                    }
                    i.metrics.settled(u);
                    let outcome = if u.success { "success" } else { "failure" };
                    tracing::Span::current().record("outcome", outcome);
                    // The call's one line at INFO: it names the call
                    // itself, since the `request` span is DEBUG's.
                    // Strings, not `%` values: a subscriber writes them as
                    // they are, without the formatting machinery.
                    tracing::info!(
                        request_id = u.request_id.as_str(),
                        route = u.route.path(),
                        model = u.model.as_str(),
                        node = u.provision_id.as_ref().map(|p| p.as_str()),
                        outcome,
                        latency_ms = u.latency_ms,
                        input_tokens = u.input_tokens,
                        output_tokens = u.output_tokens,
                        charged = u.charged.0,
                        "request settled"
                    );
                    return Some(u.charged);
                }
                Ok(false) => {
                    tracing::warn!(request = %st.request_id, "request was settled by someone else");
                    return None;
                }
                Err(e) if e.is_retryable() && attempt < 5 => {
                    tracing::warn!(error = %e, request = %st.request_id, "settle failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    // A reservation in the store stays, and the
                    // stale-reservation sweep releases it; a hold in memory
                    // stays until its account is read again. Either way the
                    // user is never charged for an unrecorded request.
                    tracing::error!(error = %e, request = %st.request_id, "settle failed");
                    return None;
                }
            }
        }
        None
    }

    /// Records one forwarded attempt that started at `t0`: its latency and
    /// success on the node's load, its outcome on the node's circuit breaker.
    pub(crate) fn attempt_done(&self, node: &Node, t0: Instant, outcome: Outcome) {
        node.observe(elapsed_us(t0), matches!(outcome, Outcome::Success));
        let i = self.inner();
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

    /// Records a refusal no other node contradicted: confirmed by another
    /// refusal, it counts as an answer; unconfirmed, only its latency counts
    /// (a caller sending bad requests must not be able to eject an honest
    /// node). A contradicted refusal is an [`Outcome::Failure`] instead.
    fn refusal_done(&self, node: &Node, t0: Instant, confirmed: bool) {
        if confirmed {
            self.attempt_done(node, t0, Outcome::Success);
        } else {
            node.observe(elapsed_us(t0), true);
        }
    }

    /// Judges the attempts still racing after another won: each runs to its
    /// answer or its own timeout in the background, and its outcome counts on
    /// its node (a hung node is ejected at its first timeout although no
    /// caller waited for it). Their answers are dropped unread.
    fn judge(&self, mut losers: FuturesUnordered<BoxFuture<'static, Raced>>) {
        let broker = self.clone();
        tokio::spawn(async move {
            while let Some(r) = losers.next().await {
                match r.result {
                    Ok(_) => broker.attempt_done(&r.node, r.t0, Outcome::Success),
                    Err(e) if e.kind == Failure::Refused => {
                        broker.refusal_done(&r.node, r.t0, false)
                    }
                    Err(e) => broker.attempt_done(&r.node, r.t0, e.outcome()),
                }
            }
        });
    }
}

/// Spawns part of a call that may outlive its caller's connection (the call
/// itself, a stream's relay): it keeps the request's span, and a serving
/// thread counts it, so that the thread does not stop under a call whose
/// caller hung up.
fn spawn_outliving<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    // Boxed first: a call's future is several kilobytes (a stream's relay
    // about 4), and each wrapper below and tokio's spawn would move it.
    tokio::spawn(crate::http::workers::tracked(
        Box::pin(task).instrument(tracing::Span::current()),
    ))
}

/// Whether a stored usage record is the one a settlement of ours would have
/// written (compared on what money and statistics depend on, since stores
/// may round timestamps).
fn same_settlement(kept: &UsageRecord, ours: &UsageRecord) -> bool {
    (
        kept.success,
        kept.charged,
        kept.reward,
        kept.input_tokens,
        kept.output_tokens,
    ) == (
        ours.success,
        ours.charged,
        ours.reward,
        ours.input_tokens,
        ours.output_tokens,
    ) && kept.provision_id == ours.provision_id
}

/// One admitted request on its way through selection, forwarding and settling.
struct CallContext {
    broker: Broker,
    /// What the call holds, and for whom.
    hold: Hold,
    /// What it counted against its rate limits.
    rate: Ticket,
    /// What it holds of its key's budget.
    budget: BudgetTicket,
    prep: Prepared,
    /// The price of the model being tried (`prep.model`).
    price: Arc<PriceEntry>,
    /// The models to fall back on, in order, each with its price.
    fallbacks: std::collections::VecDeque<(String, Arc<PriceEntry>)>,
    /// The name the caller asked for first (an alias as written).
    requested: String,
    app: Option<String>,
    preferences: RoutePreferences,
    started: Instant,
    /// Where a complete answer is kept, when the call uses the cache.
    cache: Option<cache::Plan>,
}

impl CallContext {
    /// Settles the call (see [`Broker::settle`]), then gives its key's
    /// budget what the charge did not use. A settlement not known to be
    /// committed leaves the whole hold counted: the budget errs on the side
    /// of spending less.
    async fn settle(&self, st: Settlement) -> Result<()> {
        let charged = st.charged;
        let settled = self.broker.settle(&self.hold, st).await;
        if settled.is_ok() {
            self.budget.settled(charged).await;
        }
        settled
    }

    /// Keeps a complete, charged plain answer in the response cache when
    /// the call uses it.
    fn keep(&self, body: &Bytes, meter: Meter, charged: Credits) {
        if let Some(plan) = &self.cache {
            if cache::complete_answer(self.prep.route.service(), body) {
                let b = self.broker.inner();
                b.cache.put(plan, body.clone(), meter, charged);
            }
        }
    }

    /// Answers from a cache entry: settled first (no node, no reward, the
    /// cache price), then the kept answer, plainly or replayed as a stream.
    async fn answer_from_cache(self, entry: Arc<cache::Entry>) -> Result<GatewayResponse> {
        let b = self.broker.inner().clone();
        let service = self.prep.route.service();
        let permille = b.config.cache.price_permille_of(service);
        let held = self.hold.reservation().amount;
        let charged = cache::hit_price(entry.charged, permille, held);
        let replayed = match self.prep.kind {
            AnswerKind::ChatSse { caller_wants_usage } => {
                // Checked before anything is charged: a body that cannot be
                // replayed is a miss that was never kept (kept bodies are
                // completions), so this does not happen; say so if it does.
                Some(
                    cache::replay(&entry.body, caller_wants_usage).ok_or_else(|| {
                        Error::backend(
                            "a cached answer could not be replayed",
                            std::io::Error::other("not a chat completion"),
                        )
                    }),
                )
            }
            _ => None,
        };
        let replayed = match replayed {
            Some(Err(e)) => {
                let st = self.settlement(None, Meter::default(), Credits::ZERO, false);
                let _ = self.settle(st).await;
                return Err(e);
            }
            Some(Ok(bytes)) => Some(bytes),
            None => None,
        };
        let mut st = self.settlement(None, entry.meter, charged, true);
        st.usage.cache_hit = true;
        // As every answer: released only once its settlement committed.
        self.settle(st).await?;
        Ok(match replayed {
            Some(bytes) => GatewayResponse::Stream {
                content_type: "text/event-stream".to_owned(),
                body: futures::stream::once(async move { Ok(bytes) }).boxed(),
            },
            None => GatewayResponse::Complete {
                content_type: "application/json".to_owned(),
                body: entry.body.clone(),
            },
        })
    }

    fn streamed(&self) -> bool {
        matches!(
            self.prep.kind,
            AnswerKind::ChatSse { .. } | AnswerKind::Binary
        )
    }

    /// The next node to try, none of `tried`.
    fn pick(&self, tried: &[ProvisionId]) -> Option<Arc<Node>> {
        let i = self.broker.inner();
        i.pools.select_with(
            self.prep.route.service(),
            &self.prep.model,
            i.selector.as_ref(),
            tried,
            &self.preferences,
        )
    }

    /// Moves on to the next model of the call, if any: the node is sent a
    /// body naming it and the call is charged its price. `false` when
    /// there is none left.
    fn next_model(&mut self) -> bool {
        while let Some((model, price)) = self.fallbacks.pop_front() {
            match services::with_model(&self.prep.body, &model) {
                Ok(body) => {
                    tracing::info!(from = %self.prep.model, to = %model, "falling back to the next model");
                    tracing::Span::current().record("model", model.as_str());
                    self.prep.body = body;
                    self.prep.model = model;
                    self.price = price;
                    return true;
                }
                Err(e) => tracing::error!(error = %e, "could not name a fallback model"),
            }
        }
        false
    }

    /// Tries the call's models in order: each on its nodes (see the module
    /// docs), the next once every node of one failed before the caller got
    /// a byte. After the first byte there is no going back.
    async fn run(mut self) -> Result<GatewayResponse> {
        let b = self.broker.inner().clone();
        let cfg = &b.config;
        let service = self.prep.route.service();
        let phase = if self.streamed() {
            Phase::StreamHeaders
        } else {
            Phase::Headers
        };
        let mut usual = b.usual.of(service, &self.prep.model, phase);
        let mut tried_models = vec![self.prep.model.clone()];
        let mut refused_before = false;
        let waits = Waits::under(
            cfg,
            match phase {
                Phase::StreamHeaders => cfg.stream_header_timeout.min(cfg.first_byte_timeout),
                _ => cfg.first_byte_timeout,
            },
        );
        let mut lone_since = Instant::now();
        let mut tried: Vec<ProvisionId> = Vec::new();
        let mut racing: FuturesUnordered<BoxFuture<'static, Raced>> = FuturesUnordered::new();
        let mut refused: Vec<(Arc<Node>, Instant)> = Vec::new();
        let mut last: Option<AttemptError> = None;
        let mut can_hedge = cfg.hedge_multiple > 0;
        loop {
            if racing.is_empty() {
                let picked = if tried.len() >= cfg.max_attempts {
                    None
                } else {
                    self.pick(&tried)
                };
                let Some(node) = picked else {
                    // Every node of this model failed before the first
                    // byte, or none serves it: the next model, if any.
                    // Its refusals are judged among themselves (another
                    // model serving says nothing of them).
                    if !self.next_model() {
                        break;
                    }
                    b.metrics.fallback(self.hold.reservation().route);
                    if !refused.is_empty() {
                        let confirmed = refused.len() >= 2;
                        for (n, t) in refused.drain(..) {
                            self.broker.refusal_done(&n, t, confirmed);
                        }
                        refused_before = true;
                    }
                    tried.clear();
                    tried_models.push(self.prep.model.clone());
                    usual = b.usual.of(service, &self.prep.model, phase);
                    continue;
                };
                if !tried.is_empty() {
                    b.metrics.failover(self.hold.reservation().route);
                }
                tried.push(node.entry.provision_id.clone());
                racing.push(self.launch(node, &usual, waits));
                can_hedge = cfg.hedge_multiple > 0;
                lone_since = Instant::now();
            }
            let hedge = can_hedge && racing.len() == 1 && tried.len() < cfg.max_attempts;
            // When to hedge follows what the pool learns meanwhile; until
            // then, look again now and then.
            let due = lone_since + self.hedge_delay(&usual);
            let wake = match usual.get() {
                Some(_) => due,
                None => due.min(Instant::now() + RECHECK),
            };
            let raced = tokio::select! {
                Some(r) = racing.next() => r,
                _ = tokio::time::sleep_until(wake.into()), if hedge => {
                    if Instant::now() < lone_since + self.hedge_delay(&usual) {
                        continue;
                    }
                    match self.pick(&tried) {
                        Some(node) => {
                            b.metrics.hedge(self.hold.reservation().route);
                            tracing::debug!(node = %node.entry.provision_id, "hedging a slow attempt");
                            tried.push(node.entry.provision_id.clone());
                            racing.push(self.launch(node, &usual, waits));
                        }
                        None => can_hedge = false,
                    }
                    continue;
                }
            };
            let Raced {
                node,
                in_flight,
                t0,
                result,
            } = raced;
            let span = tracing::Span::current();
            span.record("node", node.entry.provision_id.as_str());
            span.record("attempts", tried.len());
            let resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    b.metrics.attempt(service, e.metric());
                    tracing::warn!(node = %node.entry.provision_id, error = %e.detail, "node attempt failed");
                    drop(in_flight);
                    if e.kind == Failure::Refused {
                        refused.push((node, t0));
                    } else {
                        self.broker.attempt_done(&node, t0, e.outcome());
                    }
                    last = Some(e);
                    lone_since = Instant::now();
                    continue;
                }
            };
            usual.observe(t0.elapsed());
            if !racing.is_empty() {
                self.broker.judge(std::mem::take(&mut racing));
            }
            let attempt = tracing::debug_span!("attempt", node = %node.entry.provision_id);
            let result = self.receive(resp).instrument(attempt).await;
            match result {
                Err(e) => {
                    b.metrics.attempt(service, e.metric());
                    tracing::warn!(node = %node.entry.provision_id, error = %e.detail, "node answer failed");
                    self.broker.attempt_done(&node, t0, e.outcome());
                    last = Some(e);
                }
                Ok(answer) => {
                    b.metrics.attempt(service, AttemptOutcome::Success);
                    // Another node served what these refused: they were wrong.
                    for (n, t) in refused.drain(..) {
                        self.broker.attempt_done(&n, t, Outcome::Failure);
                    }
                    return Ok(match answer {
                        Answer::Complete(body, meter) => {
                            self.broker.attempt_done(&node, t0, Outcome::Success);
                            drop(in_flight);
                            let charged = self.price.cost(meter);
                            let st = self.settlement(Some(&node), meter, charged, true);
                            // The answer goes out only once it is charged.
                            self.settle(st).await?;
                            self.keep(&body, meter, charged);
                            let content_type = "application/json".to_owned();
                            GatewayResponse::Complete { content_type, body }
                        }
                        Answer::Stream(first, start) => {
                            self.stream(node, in_flight, t0, first, *start).await?
                        }
                    });
                }
            }
        }
        drop(racing);
        // Nothing reached the client: release the whole reservation.
        let st = self.settlement(None, Meter::default(), Credits::ZERO, false);
        // Nothing to withhold: the error below says what went wrong, and
        // whatever became of this zero charge, the call costs nothing.
        let _ = self.settle(st).await;
        if !refused.is_empty() || refused_before {
            // No node served it. Refusals by two nodes or more confirm each
            // other and count as answers; a lone refusal counts its latency.
            let confirmed = refused.len() >= 2;
            for (n, t) in &refused {
                self.broker.refusal_done(n, *t, confirmed);
            }
            return Err(Error::InvalidInput(REFUSED.to_owned()));
        }
        Err(match last {
            None => Error::NoCapacity(format!(
                "no healthy node serves `{}` right now",
                tried_models.join("` or `")
            )),
            Some(e) if e.kind == Failure::Timeout => Error::UpstreamTimeout(e.public.to_owned()),
            Some(e) => Error::Upstream(e.public.to_owned()),
        })
    }

    /// How long an attempt may take before a second one starts elsewhere.
    fn hedge_delay(&self, usual: &Usual) -> Duration {
        let cfg = &self.broker.inner().config;
        match usual.get() {
            Some(u) => u.saturating_mul(cfg.hedge_multiple).max(cfg.hedge_floor),
            None => cfg.hedge_unmeasured,
        }
    }

    /// Starts the first phase of an attempt on `node`: send the request and
    /// wait for the response headers within the adaptive wait, raising the
    /// node's latency estimate to the wait so far at the hedge point and
    /// each doubling after.
    fn launch(
        &self,
        node: Arc<Node>,
        usual: &Arc<Usual>,
        waits: Waits,
    ) -> BoxFuture<'static, Raced> {
        let i = self.broker.inner();
        let Some((uri, auth)) = node.request_target(self.prep.route) else {
            let in_flight = node.start();
            let t0 = Instant::now();
            let result = Err(AttemptError::new(
                Failure::Failed,
                "the node could not be reached",
                "the node's endpoint is not a URL",
            ));
            return futures::future::ready(Raced {
                node,
                in_flight,
                t0,
                result,
            })
            .boxed();
        };
        let send = i.forward.post_json(uri, auth, self.prep.body.clone());
        let clock = i.clock.clone();
        let usual = usual.clone();
        let mark = self.hedge_delay(&usual);
        let in_flight = node.start();
        let t0 = Instant::now();
        async move {
            let result = first_phase(send, &node, t0, waits, &usual, mark, clock.as_ref()).await;
            Raced {
                node,
                in_flight,
                t0,
                result,
            }
        }
        .boxed()
    }

    /// The second phase: the whole JSON answer, or a stream's first chunk.
    async fn receive(&self, mut resp: NodeResponse) -> std::result::Result<Answer, AttemptError> {
        let b = self.broker.inner();
        let cfg = &b.config;
        let mut stream_meter = match self.prep.kind {
            AnswerKind::ChatSse { caller_wants_usage } => {
                let m = ChatStreamMeter::new(caller_wants_usage);
                Some(match self.cache {
                    Some(_) => m.assembling(),
                    None => m,
                })
            }
            AnswerKind::Binary => None,
            AnswerKind::Json(meter_json) => {
                // Bounded as a whole too: a node trickling a byte now and
                // then must not hold the call (and its credits) for ever.
                let read = read_capped(&mut resp, cfg.idle_timeout, cfg.max_response_bytes);
                let buf = tokio::time::timeout(cfg.max_stream_duration, read)
                    .await
                    .map_err(|_| AttemptError::timeout("the answer took longer than allowed"))??;
                let meter = meter_json(&self.prep, &buf).map_err(|m| {
                    AttemptError::new(Failure::Failed, "the node's answer was malformed", m)
                })?;
                return Ok(Answer::Complete(buf, meter));
            }
        };
        // A stream: wait for its first bytes before answering the client, so
        // that a node failing now can still be replaced by another. The wait
        // is what the pool's prefill usually takes, within the bounds.
        let usual = b.usual.of(
            self.prep.route.service(),
            &self.prep.model,
            Phase::FirstChunk,
        );
        let wait = Waits::under(cfg, cfg.first_byte_timeout).timeout(usual.get());
        let t1 = Instant::now();
        let mut first = match tokio::time::timeout(wait, resp.chunk()).await {
            Err(_) => return Err(AttemptError::timeout("the node sent no bytes in time")),
            Ok(Err(e)) => {
                return Err(AttemptError::new(
                    Failure::Failed,
                    "the node's stream failed",
                    format!("node stream failed: {e}"),
                ))
            }
            Ok(Ok(None)) => return Err(AttemptError::failed("the node sent an empty answer")),
            Ok(Ok(Some(c))) => c,
        };
        usual.observe(t1.elapsed());
        let content_type = match &stream_meter {
            Some(_) => "text/event-stream".to_owned(),
            None => binary_content_type(&resp),
        };
        if let Some(m) = stream_meter.as_mut() {
            first = m.pass(first);
            if m.garbage {
                return Err(AttemptError::failed(
                    "the node sent something that is not a chat stream",
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

    fn settlement(
        &self,
        node: Option<&Node>,
        meter: Meter,
        charged: Credits,
        success: bool,
    ) -> Settlement {
        // The rate limits count what the call used, not its bound.
        self.rate.settled(bound_tokens(meter));
        let b = self.broker.inner();
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
                    verification_permille: n.stats.verification_permille(),
                };
                Some((n.entry.provider_id.clone(), b.rewards.reward(&ctx)))
            }
            _ => None,
        };
        let r = self.hold.reservation();
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
                requested_model: (self.requested != self.prep.model)
                    .then(|| self.requested.clone()),
                cache_hit: false,
            },
        }
    }

    /// Passes a stream through from its first chunk on, and settles when it
    /// ends. Answers once the first write is ready: the response's head goes
    /// out with it, and a stream that came whole (its end with its first
    /// pieces) goes out in one write, after its settlement. An audio stream
    /// whose settlement fails before anything went out is refused as a whole
    /// (`NotCharged`).
    ///
    /// Bounded on every side: the answer's bytes (`max_response_bytes`), its
    /// length in time (`max_stream_duration`, well below the reservation's
    /// life, so a stream always settles before the stale-hold sweep could
    /// release it), its output (a node streaming more content chunks than
    /// the output tokens reserved is lying) and each send to the caller
    /// (`client_send_timeout`: a caller that stops reading is treated as
    /// gone, and pays for what was passed on).
    async fn stream(
        self,
        node: Arc<Node>,
        in_flight: InFlight,
        t0: Instant,
        first: Bytes,
        start: StreamStart,
    ) -> Result<GatewayResponse> {
        let StreamStart {
            mut resp,
            mut meter,
            content_type,
        } = start;
        let (tx, rx) = mpsc::channel::<std::result::Result<Bytes, std::io::Error>>(16);
        let cfg = self.broker.inner().config.clone();
        let task = async move {
            let _in_flight = in_flight;
            enum End {
                Done,
                ClientGone,
                NodeFailed(&'static str),
            }
            let deadline = tokio::time::Instant::now() + cfg.max_stream_duration;
            let mut passed = first.len();
            let (max, bound) = (cfg.max_response_bytes, self.prep.bound.output_tokens);
            let send = |chunk: Bytes| send_within(&tx, chunk, cfg.client_send_timeout);
            let mut end = None;
            // The first piece, taken before the call answered: passed on
            // together with whatever followed it at once.
            let mut taken = Some(first);
            // What the node sent that was read ahead while gathering (its
            // end, or a failure), for the next turn to handle.
            let mut read_ahead = None;
            // Pieces that came with the node's end: passed on with the
            // stream's tail once the call is settled. A stream whose end was
            // already there (a short answer, a fast node) then goes out in
            // one write rather than in one for its pieces and one for its
            // tail, and what a write costs is most of what relaying costs.
            let mut held = Bytes::new();
            // Whether the call has answered: it waits for the first write
            // (below the loop).
            let mut answered = false;
            while end.is_none() {
                let mut out = match taken.take() {
                    Some(piece) => piece,
                    None => {
                        let next = match read_ahead.take() {
                            Some(r) => Ok(r),
                            None => tokio::select! {
                                r = tokio::time::timeout(cfg.idle_timeout, resp.chunk()) => r,
                                _ = tokio::time::sleep_until(deadline) => {
                                    end = Some(End::NodeFailed("the answer took longer than allowed"));
                                    break;
                                }
                                _ = tx.closed() => { end = Some(End::ClientGone); break; }
                            },
                        };
                        match next {
                            Err(_) => {
                                end = Some(End::NodeFailed("the node stalled mid-stream"));
                                continue;
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "node stream failed");
                                end = Some(End::NodeFailed("the node's stream failed"));
                                continue;
                            }
                            Ok(Ok(None)) => {
                                let complete = match meter.as_mut() {
                                    Some(m) => {
                                        m.finish();
                                        held = joined(std::mem::take(&mut held), m.take_output());
                                        m.done && !m.garbage
                                    }
                                    None => true,
                                };
                                end = Some(if complete {
                                    End::Done
                                } else if !send(std::mem::take(&mut held)).await {
                                    // Not answered in full: what came goes
                                    // out now, before the error.
                                    End::ClientGone
                                } else {
                                    End::NodeFailed("the node ended the stream early")
                                });
                                continue;
                            }
                            Ok(Ok(Some(chunk))) => {
                                match take_piece(chunk, &mut passed, max, &mut meter, bound) {
                                    Ok(out) => out,
                                    Err(reason) => {
                                        end = Some(End::NodeFailed(reason));
                                        continue;
                                    }
                                }
                            }
                        }
                    }
                };
                // A node's pieces often arrive together (an HTTP chunk per
                // event, read in one go) but are handed over one at a time:
                // take those already there, after letting the connection's
                // task decode the next, and pass them on in one write
                // instead of one each. Nothing waits for a piece that is not
                // there yet.
                let mut failed = None;
                let mut yielded = false;
                while out.len() < GATHER_AT_MOST {
                    match resp.chunk().now_or_never() {
                        Some(Ok(Some(c))) => {
                            yielded = false;
                            match take_piece(c, &mut passed, max, &mut meter, bound) {
                                Ok(more) => out = joined(out, more),
                                Err(reason) => {
                                    failed = Some(reason);
                                    break;
                                }
                            }
                        }
                        Some(other) => {
                            read_ahead = Some(other);
                            break;
                        }
                        None if yielded => break,
                        None => {
                            yielded = true;
                            let_ready_tasks_run().await;
                        }
                    }
                }
                if failed.is_none() && matches!(read_ahead, Some(Ok(None))) {
                    held = out;
                    continue;
                }
                let sent = if answered || !out.is_empty() {
                    send(out).await
                } else {
                    // Nothing to pass on yet (the meter holds a part of an
                    // event): an empty piece lets the call answer now,
                    // rather than keep the channel's receiving end (and so
                    // the sign of a caller gone) until output comes.
                    tx.send(Ok(out)).await.is_ok()
                };
                answered = true;
                if !sent {
                    end = Some(End::ClientGone);
                } else if let Some(reason) = failed {
                    end = Some(End::NodeFailed(reason));
                }
            }
            // Dropping the response cancels the upstream call.
            drop(resp);
            let st = match end {
                Some(End::NodeFailed(reason)) => {
                    self.broker.attempt_done(&node, t0, Outcome::Failure);
                    match &meter {
                        Some(m) => {
                            // What was delivered, counted by the broker: a
                            // node's usage claim for a broken stream is not
                            // believed.
                            let m = m.delivered(self.prep.fallback_input, self.prep.bound);
                            let event = serde_json::json!({"error": {
                                "message": format!("the stream was interrupted: {reason}"),
                                "type": "upstream_error",
                                "code": "stream_interrupted",
                            }});
                            let _ = send(Bytes::from(format!("data: {event}\n\n"))).await;
                            let charged = self.price.partial_cost(m);
                            self.settlement(Some(&node), m, charged, false)
                        }
                        None => {
                            // Audio cannot carry an error event: break the
                            // body so the client sees a truncated transfer,
                            // and charge nothing for unusable audio.
                            let _ = tokio::time::timeout(
                                cfg.client_send_timeout,
                                tx.send(Err(std::io::Error::other(reason))),
                            )
                            .await;
                            self.settlement(Some(&node), Meter::default(), Credits::ZERO, false)
                        }
                    }
                }
                Some(End::ClientGone) | Some(End::Done) | None => {
                    self.broker.attempt_done(&node, t0, Outcome::Success);
                    // A binary answer (audio) is metered by the request's
                    // bounds (characters to speak), known before it started.
                    let m = match &meter {
                        Some(m) => m.meter(self.prep.fallback_input, self.prep.bound),
                        None => self.prep.bound,
                    };
                    let charged = self.price.cost(m);
                    self.settlement(Some(&node), m, charged, true)
                }
            };
            // Settle before the body ends: a client that has read the whole
            // answer can rely on it being charged and recorded. A chat
            // stream's end (its usage chunk and `[DONE]`) was held back for
            // this, with the pieces that came with the node's end; a
            // settlement that did not commit ends it with an error event
            // instead, and an audio body breaks.
            let kept_meter = Meter {
                input_tokens: st.usage.input_tokens,
                output_tokens: st.usage.output_tokens,
                units: st.usage.units,
            };
            let kept_charge = st.charged;
            let settled = self.settle(st).await;
            if matches!(end, Some(End::Done)) {
                match (settled, meter.as_mut()) {
                    (Ok(()), Some(m)) => {
                        let _ = send(joined(held, m.take_tail())).await;
                        // A complete stream, charged: kept as the
                        // completion it assembled into.
                        if let (Some(plan), Some(a)) = (&self.cache, m.assembly.take()) {
                            if let Some(body) = a.completion(kept_meter) {
                                self.broker
                                    .inner()
                                    .cache
                                    .put(plan, body, kept_meter, kept_charge);
                            }
                        }
                    }
                    (Ok(()), None) => {
                        let _ = send(held).await;
                    }
                    (Err(e), Some(_)) => {
                        let event = serde_json::json!({"error": {
                            "message": NOT_CHARGED,
                            "type": "service_unavailable",
                            "code": "not_charged",
                        }});
                        tracing::warn!(error = %e, "a stream's settlement did not commit");
                        let event = Bytes::from(format!("data: {event}\n\n"));
                        let _ = send(joined(held, event)).await;
                    }
                    (Err(e), None) => {
                        // What was held back is not passed on: the audio is
                        // broken off either way. When nothing went out
                        // before, the call is refused as a whole (below).
                        tracing::warn!(error = %e, "a stream's settlement did not commit");
                        let _ = tokio::time::timeout(
                            cfg.client_send_timeout,
                            tx.send(Err(std::io::Error::other(NOT_CHARGED))),
                        )
                        .await;
                    }
                }
            }
            drop(tx);
        };
        spawn_outliving(task);
        // Answers once the relay has its first write ready (or has ended),
        // so that the response's head goes out in the same write as it
        // rather than alone.
        let mut rx = rx;
        let ready = match rx.recv().await {
            // The one error a relay sends before any bytes is its
            // settlement's (a node's failure follows what was passed on):
            // nothing went out, so the call is refused like a plain one.
            Some(Err(_)) => return Err(Error::NotCharged(NOT_CHARGED.to_owned())),
            Some(Ok(piece)) if piece.is_empty() => None,
            ready => ready,
        };
        Ok(GatewayResponse::Stream {
            content_type,
            body: futures::stream::iter(ready)
                .chain(tokio_stream::wrappers::ReceiverStream::new(rx))
                .boxed(),
        })
    }
}

/// Most bytes of a stream gathered into one write to the caller (see
/// [`CallContext::stream`]).
const GATHER_AT_MOST: usize = 64 << 10;

/// Takes one piece of a streamed answer: counts it against `max` bytes,
/// feeds the chat meter (whose rewritten events are what is passed on) and
/// checks what the node sent so far; the reason to end the stream when the
/// piece breaks a rule (it is then not passed on).
fn take_piece(
    chunk: Bytes,
    passed: &mut usize,
    max: usize,
    meter: &mut Option<ChatStreamMeter>,
    output_bound: u64,
) -> std::result::Result<Bytes, &'static str> {
    *passed = passed.saturating_add(chunk.len());
    if *passed > max {
        return Err("the node's answer was too large");
    }
    let Some(m) = meter.as_mut() else {
        return Ok(chunk);
    };
    let out = m.pass(chunk);
    if m.garbage {
        return Err("the node sent garbage mid-stream");
    }
    if m.content_chunks > output_bound {
        // Each content chunk is at least one token: the node produced more
        // than it was asked for.
        return Err("the node sent more output than was asked for");
    }
    Ok(out)
}

/// Lets the tasks already woken on this thread run (the node connection's
/// task decoding what it has read), then resumes.
///
/// Not `tokio::task::yield_now`: that one resumes only after the runtime
/// has run out of ready tasks and polled its I/O driver, an `epoll_wait`
/// for each streamed piece gathered. Waking itself puts the task at the
/// back of the queue, behind the tasks already woken, and the driver's
/// turn comes as usual.
async fn let_ready_tasks_run() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            return std::task::Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// `a` followed by `b` (without a copy when either is empty).
fn joined(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut both = bytes::BytesMut::with_capacity(a.len() + b.len());
    both.extend_from_slice(&a);
    both.extend_from_slice(&b);
    both.freeze()
}

/// Passes `chunk` on to the caller within `timeout`: `false` when the caller
/// is gone or stopped reading. An empty chunk is not sent (it would end a
/// chunked body early).
async fn send_within(
    tx: &mpsc::Sender<std::result::Result<Bytes, std::io::Error>>,
    chunk: Bytes,
    timeout: Duration,
) -> bool {
    chunk.is_empty()
        || matches!(
            tokio::time::timeout(timeout, tx.send(Ok(chunk))).await,
            Ok(Ok(()))
        )
}

/// Sends a request and waits for a usable response's headers within
/// `timeout`; see [`CallContext::launch`].
async fn first_phase(
    send: impl std::future::Future<Output = std::result::Result<NodeResponse, forward::SendError>>,
    node: &Node,
    t0: Instant,
    waits: Waits,
    usual: &Usual,
    mut mark: Duration,
    clock: &dyn Clock,
) -> std::result::Result<NodeResponse, AttemptError> {
    tokio::pin!(send);
    let sent = loop {
        // The allowed wait follows what the pool learns meanwhile: an attempt
        // started before its pool had a measurement is not left with the
        // ceiling once calls elsewhere showed what is usual.
        let deadline = t0 + waits.timeout(usual.get());
        let mut at = (t0 + mark).min(deadline);
        if usual.get().is_none() {
            at = at.min(Instant::now() + RECHECK);
        }
        tokio::select! {
            r = &mut send => break r,
            _ = tokio::time::sleep_until(at.into()) => {
                let now = Instant::now();
                if now >= t0 + waits.timeout(usual.get()) {
                    return Err(AttemptError::timeout("the node did not answer in time"));
                }
                if now >= t0 + mark {
                    // Still waiting: the node is at least this slow right now.
                    node.observe_outstanding(elapsed_us(t0));
                    mark = mark.saturating_mul(2);
                }
            }
        }
    };
    let resp = match sent {
        Err(e) if forward::is_timeout(&e) => {
            return Err(AttemptError::new(
                Failure::Timeout,
                "the node did not answer in time",
                format!("node timed out: {e}"),
            ))
        }
        // The error's text may name the node's address: it goes to the log only.
        Err(e) => {
            return Err(AttemptError::new(
                Failure::Failed,
                "the node could not be reached",
                format!("node unreachable: {e}"),
            ))
        }
        Ok(r) => r,
    };
    let status = resp.status();
    if matches!(status.as_u16(), 400 | 413 | 422) {
        return Err(match rejection_message(resp).await {
            Some(m) => AttemptError::new(Failure::Refused, REFUSED, format!("node refused: {m}")),
            None => AttemptError::failed("the node refused the request without saying why"),
        });
    }
    if !status.is_success() {
        let detail = format!("node answered {status}");
        return Err(
            match health::classify(status, resp.headers(), clock.now()) {
                Outcome::Busy(d) => AttemptError::new(Failure::Busy(d), "the node is busy", detail),
                _ => AttemptError::new(Failure::Failed, "the node failed", detail),
            },
        );
    }
    Ok(resp)
}

/// The content type of a binary answer: the node's, when it is audio or
/// octet-stream (never anything a browser would render), else `audio/wav`.
fn binary_content_type(resp: &NodeResponse) -> String {
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
/// read with a small cap and cleaned for the log; `None` when there is none.
async fn rejection_message(mut resp: NodeResponse) -> Option<String> {
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
    resp: &mut NodeResponse,
    idle: Duration,
    cap: usize,
) -> std::result::Result<Bytes, AttemptError> {
    resp.read_capped(cap, idle).await.map_err(|e| match e {
        ReadError::Stalled => AttemptError::timeout("the node stalled mid-answer"),
        ReadError::Failed(e) => AttemptError::new(
            Failure::Failed,
            "the node's answer failed",
            format!("node answer failed: {e}"),
        ),
        ReadError::TooLarge => AttemptError::failed("the node's answer was too large"),
    })
}

fn elapsed_us(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_waits_follow_the_pool_within_bounds() {
        let (floor, ceiling) = (Duration::from_secs(2), Duration::from_secs(60));
        let w = Waits {
            multiple: 20,
            floor,
            ceiling,
        };
        assert_eq!(w.timeout(None), ceiling);
        let ms = Duration::from_millis;
        assert_eq!(w.timeout(Some(ms(3))), floor);
        assert_eq!(w.timeout(Some(ms(500))), ms(10_000));
        assert_eq!(w.timeout(Some(ms(9_000))), ceiling);
    }

    #[test]
    fn the_usual_duration_is_a_slow_average() {
        let u = Usual::default();
        assert_eq!(u.get(), None);
        u.observe(Duration::from_millis(8));
        assert_eq!(u.get(), Some(Duration::from_millis(8)));
        // One outlier moves it by an eighth of the difference.
        u.observe(Duration::from_millis(808));
        assert_eq!(u.get(), Some(Duration::from_millis(108)));
    }
}
