//! Verification: catching nodes that do not serve what they claim.
//!
//! The broker sends each routable node **canary calls**: calls shaped like
//! users' (same route, body shape and forwarding path, through
//! [`Broker::handle`] with a key of the platform's own canary account),
//! content varied from round to round, no marker. Every node of a pool gets
//! the same content in one round and the answers are compared:
//!
//! * embeddings: a node's vector must agree (cosine at least the model's
//!   tolerance) with the majority's, or with a vector the operator pinned;
//! * chat at temperature 0 with one seed per round, streamed or not: the
//!   first tokens of a node's answer must be the majority's, or the pinned
//!   answer's;
//! * speech: a WAV whose duration is plausible for the text (voices and
//!   engines differ, so nodes are not compared with each other);
//! * scraping, when [`VerifyConfig::page_base`] is set: a page this host
//!   serves for the canary alone must come back with its text.
//!
//! Each verdict moves the node's score (kept with its other live state in
//! the routing index); failures in a row **quarantine** it (it leaves routing
//! like a node with an open breaker, and its provider and the admin see why
//! in the node's view); passes in a row while quarantined let it back. The
//! score is an input selectors ([`crate::select::VerifiedFirst`]) and reward
//! policies ([`crate::reward::VerifiedReward`]) may weigh.
//!
//! Canaries are paid like any call: charged to the canary account (which
//! the broker tops up with grants: the platform pays), and the node earns
//! what the reward policy gives, so it cannot tell a canary by its pay.
//! Their usage is left out of user statistics (see [`crate::stats`]).
//!
//! Reputation is kept per host, in memory: each host runs its own canaries
//! over the nodes it routes to (see `docs/ARCHITECTURE.md`, "Verification").

mod canary;
mod compare;
mod reputation;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

use crate::broker::{Broker, GatewayRequest, GatewayResponse};
use crate::error::Result;
use crate::pool::RoutePreferences;
use crate::secret::Secret;
use crate::types::{CacheDirective, Credits, ProvisionId, Route, Service, UserId};
use crate::wire::NodeVerification;
use compare::Verdict;
use reputation::{Change, Reputation};

/// Settings of verification (kept in [`crate::BrokerConfig::verify`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VerifyConfig {
    /// How often [`crate::Broker::spawn_maintenance`] runs a round of
    /// canaries (`None`: never; [`Broker::run_canaries`] still runs one).
    pub interval: Option<Duration>,
    /// The most canary calls one round sends (its cost): pools are visited
    /// in turn from round to round, each pool's nodes together, until the
    /// next pool would go over.
    pub max_calls_per_round: usize,
    /// Failed checks in a row that quarantine a node.
    pub quarantine_after: u32,
    /// Passed checks in a row that let a quarantined node back.
    pub requalify_after: u32,
    /// The least cosine two embeddings of one text by one model must have
    /// (models without a [`ModelTolerance`]).
    pub min_cosine: f64,
    /// How many leading tokens of a chat answer at temperature 0 nodes of
    /// one model must agree on (models without a [`ModelTolerance`]).
    pub chat_prefix_tokens: usize,
    /// The output limit of chat canaries (what they cost).
    pub chat_max_tokens: u32,
    /// How fast speech may be spoken, in characters a second (least, most):
    /// speech whose duration puts its text outside is suspect (audio cut
    /// short, or padded).
    pub speech_chars_per_second: (f64, f64),
    /// Tolerances per model, where the default does not fit (a model the
    /// operator allows quantized further, say).
    pub tolerances: Vec<ModelTolerance>,
    /// Inputs with answers the operator pinned: a node is checked against
    /// them alone, so even a lone node, or a pool of liars, is caught.
    pub references: Vec<PinnedReference>,
    /// Where nodes reach this host's canary pages (`GET /pages/{token}`),
    /// e.g. `https://pages.example.com`: a public address the nodes' egress
    /// rules allow, best a name of its own that a reverse proxy sends here.
    /// `None` (the default): scraping nodes get no canaries.
    pub page_base: Option<String>,
    /// The email of the platform's canary account (made when first needed).
    pub account_email: String,
    /// What the canary account is topped up to when it runs below half of it.
    pub account_topup: Credits,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            interval: Some(Duration::from_secs(300)),
            max_calls_per_round: 64,
            quarantine_after: 2,
            requalify_after: 3,
            min_cosine: DEFAULT_MIN_COSINE,
            chat_prefix_tokens: 8,
            chat_max_tokens: 32,
            speech_chars_per_second: (4.0, 40.0),
            tolerances: Vec::new(),
            references: Vec::new(),
            page_base: None,
            account_email: "canary@cxmpute.internal".into(),
            account_topup: Credits(100_000_000),
        }
    }
}

/// The default least cosine between two nodes' embeddings of one text. Why
/// this value: `docs/ARCHITECTURE.md`, "Verification", and the measurement
/// in this module's tests.
pub const DEFAULT_MIN_COSINE: f64 = 0.98;

impl VerifyConfig {
    /// Refuses settings that would judge nothing or everything.
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |m: String| Err(crate::Error::InvalidInput(format!("verify: {m}")));
        let cosines =
            std::iter::once(self.min_cosine).chain(self.tolerances.iter().map(|t| t.min_cosine));
        for c in cosines {
            if !(c > -1.0 && c <= 1.0) {
                return bad(format!("a least cosine of {c} is not in (-1, 1]"));
            }
        }
        let prefixes = std::iter::once(self.chat_prefix_tokens)
            .chain(self.tolerances.iter().map(|t| t.chat_prefix_tokens));
        if prefixes.into_iter().any(|n| n == 0) {
            return bad("chat prefix tokens must be at least 1".into());
        }
        let (lo, hi) = self.speech_chars_per_second;
        if !(lo > 0.0 && lo < hi && hi.is_finite()) {
            return bad(format!(
                "speech characters a second ({lo}, {hi}) must be 0 < least < most"
            ));
        }
        if let Some(base) = &self.page_base {
            crate::egress::parse_http_url(base)
                .map_err(|e| crate::Error::InvalidInput(format!("verify: page_base: {e}")))?;
        }
        if self.quarantine_after == 0 || self.requalify_after == 0 {
            return bad("quarantine_after and requalify_after must be at least 1".into());
        }
        Ok(())
    }

    /// (least cosine, chat prefix tokens) for a pool.
    fn tolerance(&self, service: Service, model: &str) -> (f64, usize) {
        (self.tolerances.iter())
            .find(|t| t.service == service && t.model == model)
            .map_or((self.min_cosine, self.chat_prefix_tokens), |t| {
                (t.min_cosine, t.chat_prefix_tokens)
            })
    }
}

/// The tolerance of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelTolerance {
    /// The service.
    pub service: Service,
    /// The model.
    pub model: String,
    /// The least cosine between two embeddings of one text.
    pub min_cosine: f64,
    /// The leading tokens of a chat answer nodes must agree on.
    pub chat_prefix_tokens: usize,
}

/// An input whose answer the operator knows.
#[derive(Clone, Debug, PartialEq)]
pub struct PinnedReference {
    /// The service (chat or embeddings).
    pub service: Service,
    /// The model.
    pub model: String,
    /// The text to embed, or the chat prompt.
    pub input: String,
    /// The answer.
    pub answer: PinnedAnswer,
}

/// A pinned answer.
#[derive(Clone, Debug, PartialEq)]
pub enum PinnedAnswer {
    /// A chat answer (its first tokens are compared).
    Text(String),
    /// An embedding.
    Vector(Vec<f64>),
}

/// What one round of canaries did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CanaryReport {
    /// Canary calls sent.
    pub calls: usize,
    /// Verdicts: passed.
    pub passed: usize,
    /// Verdicts: failed.
    pub failed: usize,
    /// Calls that gave no verdict (no majority, no reference, a failed call).
    pub inconclusive: usize,
    /// Nodes this round quarantined.
    pub quarantined: Vec<ProvisionId>,
    /// Nodes this round let back.
    pub requalified: Vec<ProvisionId>,
}

/// Verification's state on one host (inside the broker).
pub(crate) struct Verifier {
    reputations: Mutex<HashMap<ProvisionId, Reputation>>,
    /// The canary account and this host's key to it, once made.
    account: tokio::sync::Mutex<Option<(UserId, Secret)>>,
    /// The canary account's id, readable without waiting (statistics).
    canary_user: OnceLock<UserId>,
    /// Rounds run: which pools come first, and when pinned inputs are used.
    rounds: AtomicU64,
    rng: Mutex<rand::rngs::StdRng>,
    /// The pages scraping canaries name while they run: token, HTML.
    pages: Mutex<HashMap<String, String>>,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            reputations: Mutex::default(),
            account: tokio::sync::Mutex::default(),
            canary_user: OnceLock::new(),
            rounds: AtomicU64::new(0),
            rng: Mutex::new(rand::rngs::StdRng::from_os_rng()),
            pages: Mutex::default(),
        }
    }
}

impl Verifier {
    /// Whether `user` is the platform's canary account.
    pub(crate) fn is_canary(&self, user: &UserId) -> bool {
        self.canary_user.get() == Some(user)
    }
}

/// How long a quarantined node that left the index is remembered: one that
/// comes back within it (ended and started again) is still quarantined.
const QUARANTINE_MEMORY: Duration = Duration::from_secs(7 * 24 * 3600);

/// One pool's round: its nodes and what each is sent.
struct PoolRound {
    service: Service,
    model: String,
    nodes: Vec<ProvisionId>,
    input: String,
    pinned: Option<PinnedAnswer>,
}

impl Broker {
    /// Runs one round of canary calls now (see [`crate::verify`]): visits
    /// pools in turn within [`VerifyConfig::max_calls_per_round`], judges
    /// the answers, and quarantines or lets back nodes. Spawned by
    /// [`Broker::spawn_maintenance`] every [`VerifyConfig::interval`]; tests
    /// call it to drive rounds.
    pub async fn run_canaries(&self) -> Result<CanaryReport> {
        let i = self.inner();
        let cfg = &i.config.verify;
        let v = &i.verify;
        let round = v.rounds.fetch_add(1, Ordering::Relaxed);
        let mut report = CanaryReport::default();
        self.keep_quarantines();
        let mut pools = i.pools.canary_pools(cfg.page_base.is_some());
        if pools.is_empty() {
            return Ok(report);
        }
        let (_, key) = self.canary_account().await?;
        // Pools in turn, so a small budget still reaches each in time.
        let start = (round % pools.len() as u64) as usize;
        pools.rotate_left(start);
        let mut budget = cfg.max_calls_per_round;
        let mut plans = Vec::new();
        for (service, model, nodes) in pools {
            if nodes.len() > budget {
                continue;
            }
            budget -= nodes.len();
            plans.push(self.plan(service, model, nodes, round));
        }
        for plan in plans {
            self.run_pool(&key, plan, &mut report).await;
        }
        Ok(report)
    }

    /// What a pool is sent this round: a pinned input on odd rounds, or
    /// always when the pool is too small for a majority; else fresh content.
    fn plan(
        &self,
        service: Service,
        model: String,
        nodes: Vec<ProvisionId>,
        round: u64,
    ) -> PoolRound {
        let cfg = &self.inner().config.verify;
        let refs: Vec<&PinnedReference> = (cfg.references.iter())
            .filter(|r| r.service == service && r.model == model)
            .collect();
        let mut rng = self.inner().verify.rng.lock();
        if !refs.is_empty() && (nodes.len() < 3 || round % 2 == 1) {
            let r = refs[rng.random_range(0..refs.len())];
            return PoolRound {
                service,
                model,
                nodes,
                input: r.input.clone(),
                pinned: Some(r.answer.clone()),
            };
        }
        let input = match service {
            Service::Embeddings | Service::Tts => canary::embedding_text(&mut *rng),
            Service::Scrape => canary::page_text(&mut *rng),
            _ => canary::chat_prompt(&mut *rng),
        };
        PoolRound {
            service,
            model,
            nodes,
            input,
            pinned: None,
        }
    }

    /// Sends a pool's nodes their canaries at once, judges the answers and
    /// records the verdicts.
    async fn run_pool(&self, key: &Secret, plan: PoolRound, report: &mut CanaryReport) {
        let i = self.inner();
        let cfg = &i.config.verify;
        let (min_cosine, tokens) = cfg.tolerance(plan.service, &plan.model);
        let mut page_token = None;
        let mut streamed = false;
        let (route, body) = match plan.service {
            Service::Embeddings => (
                Route::Embeddings,
                canary::embedding_body(&plan.model, &plan.input),
            ),
            Service::Tts => {
                let body = canary::speech_body(&plan.model, &plan.input, &mut *i.verify.rng.lock());
                (Route::AudioSpeech, body)
            }
            Service::Scrape => {
                let base = cfg.page_base.as_deref().unwrap_or_default();
                let token = crate::secret::random_token(22);
                let url = format!("{}/pages/{token}", base.trim_end_matches('/'));
                let html = canary::page_html(&plan.input);
                i.verify.pages.lock().insert(token.clone(), html);
                page_token = Some(token);
                let body = canary::scrape_body(&plan.model, &url, &mut *i.verify.rng.lock());
                (Route::Scrape, body)
            }
            _ => {
                // One seed for the pool's round, a fresh one each round: a
                // fixed seed would be a marker.
                let (seed, stream) = {
                    let mut rng = i.verify.rng.lock();
                    (rng.random::<u32>(), rng.random_bool(0.5))
                };
                streamed = stream;
                let max = cfg.chat_max_tokens;
                let body = canary::chat_body(&plan.model, &plan.input, seed, max, stream);
                (Route::ChatCompletions, body)
            }
        };
        let body = Bytes::from(body.to_string());
        let calls = plan.nodes.iter().map(|id| {
            let req = GatewayRequest {
                api_key: Some(key.clone()),
                route,
                body: body.clone(),
                app: None,
                preferences: RoutePreferences::pinned(id.clone()),
                // A canary checks a node: never answered from the cache.
                cache: Some(CacheDirective::NoStore),
            };
            async move {
                match self.handle(req).await {
                    Ok(GatewayResponse::Complete { body, .. }) => Some(body.to_vec()),
                    // Read to its end (the gateway bounds it), which settles it.
                    Ok(GatewayResponse::Stream { mut body, .. }) => {
                        let mut all = Vec::new();
                        while let Some(chunk) = futures::StreamExt::next(&mut body).await {
                            all.extend_from_slice(&chunk.ok()?);
                        }
                        Some(all)
                    }
                    Err(e) => {
                        tracing::debug!(node = %id, error = %e, "canary call failed");
                        None
                    }
                }
            }
        });
        let answers = futures::future::join_all(calls).await;
        if let Some(t) = page_token {
            i.verify.pages.lock().remove(&t);
        }
        report.calls += answers.len();
        let verdicts = match plan.service {
            Service::Scrape => (answers.iter())
                .map(|a| compare::page_returned(a.as_deref(), &plan.input))
                .collect(),
            Service::Tts => {
                let chars = plan.input.chars().count();
                let cps = cfg.speech_chars_per_second;
                (answers.iter())
                    .map(|a| compare::speech_plausible(a.as_deref(), chars, cps))
                    .collect()
            }
            Service::Embeddings => {
                let vs: Vec<Option<Vec<f64>>> = (answers.iter())
                    .map(|a| a.as_deref().and_then(canary::embedding_of))
                    .collect();
                match &plan.pinned {
                    Some(PinnedAnswer::Vector(p)) => (vs.iter())
                        .map(|a| compare::embedding_against(a.as_deref(), p, min_cosine))
                        .collect(),
                    _ => compare::embeddings_by_majority(&vs, min_cosine),
                }
            }
            _ => {
                let read = match streamed {
                    true => canary::chat_stream_text_of,
                    false => canary::chat_text_of,
                };
                let ts: Vec<Option<String>> = (answers.iter())
                    .map(|a| a.as_deref().and_then(read))
                    .collect();
                match &plan.pinned {
                    Some(PinnedAnswer::Text(p)) => (ts.iter())
                        .map(|a| compare::chat_against(a.as_deref(), p, tokens))
                        .collect(),
                    _ => compare::chat_by_majority(&ts, tokens),
                }
            }
        };
        // An answer that came back but could not be read is the node's
        // fault: it was a well-formed call of the pool's model.
        let verdicts: Vec<Verdict> = (verdicts.into_iter().zip(&answers))
            .map(|(v, a)| match (v, a) {
                (Verdict::Inconclusive, Some(_)) if plan.pinned.is_some() => {
                    Verdict::Suspect("its answer to a canary could not be read".into())
                }
                (v, _) => v,
            })
            .collect();
        let now = self.now();
        for (id, verdict) in plan.nodes.iter().zip(&verdicts) {
            let name = match verdict {
                Verdict::Pass => "pass",
                Verdict::Suspect(_) => "fail",
                Verdict::Inconclusive => "inconclusive",
            };
            i.metrics.canary_verdict(plan.service, name);
            match verdict {
                Verdict::Pass => report.passed += 1,
                Verdict::Suspect(why) => {
                    report.failed += 1;
                    tracing::warn!(node = %id, model = %plan.model, why = %why, "node failed a canary");
                }
                Verdict::Inconclusive => report.inconclusive += 1,
            }
            let (change, score) = {
                let mut reps = i.verify.reputations.lock();
                let r = reps.entry(id.clone()).or_default();
                let c = r.record(verdict, now, cfg.quarantine_after, cfg.requalify_after);
                (c, r.view().score_permille)
            };
            if let Some(s) = i.pools.stats(id) {
                s.set_verification_permille(score);
            }
            match change {
                Change::None => {}
                Change::Quarantined => {
                    tracing::warn!(node = %id, model = %plan.model, "node quarantined by verification");
                    i.pools.set_quarantined(id, true);
                    report.quarantined.push(id.clone());
                }
                Change::Requalified => {
                    tracing::info!(node = %id, model = %plan.model, "node re-qualified");
                    i.pools.set_quarantined(id, false);
                    report.requalified.push(id.clone());
                }
            }
        }
    }

    /// Forgets the records of nodes that left the index in good standing,
    /// and of quarantined ones gone for [`QUARANTINE_MEMORY`] (then their
    /// mark in the index too), so the table stays as large as the network.
    /// A quarantined node that joins again sooner stays out: the index
    /// keeps the mark.
    fn keep_quarantines(&self) {
        let i = self.inner();
        let forget_before = self.now().minus(QUARANTINE_MEMORY);
        let mut reps = i.verify.reputations.lock();
        reps.retain(|id, r| {
            let present = i.pools.stats(id).is_some();
            if !r.quarantined() {
                return present;
            }
            let keep = present || r.view().checked_at.is_some_and(|t| t >= forget_before);
            if !keep {
                i.pools.set_quarantined(id, false);
            }
            keep
        });
    }

    /// The platform's canary account and this host's key to it; made, and
    /// topped up to [`VerifyConfig::account_topup`] when below half of it.
    async fn canary_account(&self) -> Result<(UserId, Secret)> {
        let i = self.inner();
        let cfg = &i.config.verify;
        let mut held = i.verify.account.lock().await;
        let (user, key) = match held.as_ref() {
            Some(a) => a.clone(),
            None => {
                let email = crate::accounts::normalize_email(&cfg.account_email)?;
                let (user, _) = self.accounts().user_for_email(email, false).await?;
                // One key for every host and restart: derived, made once.
                let secret = self.auth_state().derived_api_key("canary account");
                match i.store.api_key_by_hash(&secret.hash()).await {
                    Ok(k) if k.user_id == user.id => {}
                    Ok(_) => {
                        return Err(crate::Error::Conflict(
                            "the canary key belongs to another account".into(),
                        ))
                    }
                    Err(crate::Error::NotFound(_)) => {
                        let accounts = self.accounts();
                        let made =
                            accounts.new_key(&user.id, "canary", None, Vec::new(), secret.clone());
                        match made.await {
                            // Another host made it meanwhile.
                            Ok(_) | Err(crate::Error::AlreadyExists(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                }
                let _ = i.verify.canary_user.set(user.id.clone());
                *held = Some((user.id.clone(), secret.clone()));
                (user.id, secret)
            }
        };
        let balance = i.store.user(&user).await?.credits;
        if balance < Credits(cfg.account_topup.0 / 2) {
            let top_up = cfg.account_topup.saturating_sub(balance);
            (self.admin())
                .grant_credits(&user, top_up, "system", "canary calls")
                .await?;
        }
        Ok((user, key))
    }

    /// The page of a scraping canary running now, by its token.
    pub(crate) fn canary_page(&self, token: &str) -> Option<String> {
        self.inner().verify.pages.lock().get(token).cloned()
    }

    /// What verification knows about node `id` on this host.
    pub(crate) fn verification_of(&self, id: &ProvisionId) -> NodeVerification {
        let reps = self.inner().verify.reputations.lock();
        reps.get(id).map(|r| r.view().clone()).unwrap_or_default()
    }

    /// The platform's canary account, once a round has made it.
    pub fn canary_account_id(&self) -> Option<UserId> {
        self.inner().verify.canary_user.get().cloned()
    }
}

#[cfg(test)]
mod tests;
