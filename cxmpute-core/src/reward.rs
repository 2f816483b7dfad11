//! Paying providers: the [`RewardPolicy`] trait and its implementations.
//!
//! A policy sees one settled, successful request and returns what its
//! provider earns. The broker asks only for requests that succeeded on a node
//! (failed requests earn nothing), and the store clamps a reward to what the
//! user was charged, so the platform never pays out more for a request than
//! it took in; the platform keeps the rest.
//!
//! | policy | reward |
//! |---|---|
//! | [`FlatReward`] | the same amount per request (the original's early 0.01) |
//! | [`TieredReward`] | the original's last formula: by node tier, service, model size, tokens and latency |
//! | [`RevenueShare`] | a fixed share, in basis points, of what the user paid |
//!
//! Money is integer micro-credits throughout; factors are integer per-mille
//! (1,000 = ×1.0) and the one rounding happens at the end.

use std::collections::HashMap;

use crate::pricing::Meter;
use crate::types::{Credits, Service};

/// Everything a policy may weigh.
#[derive(Clone, Debug)]
pub struct RewardContext<'a> {
    /// The service.
    pub service: Service,
    /// The model.
    pub model: &'a str,
    /// The node's capacity tier (1-4).
    pub tier: u8,
    /// What was metered.
    pub meter: Meter,
    /// Wall time of the request in milliseconds.
    pub latency_ms: u64,
    /// What the user is charged.
    pub charged: Credits,
    /// The node's verification score, per mille (1,000: nothing found
    /// against it; see [`crate::verify`]).
    pub verification_permille: u16,
}

/// Turns a successful request into a provider reward.
pub trait RewardPolicy: Send + Sync + 'static {
    /// The provider's reward for the request.
    fn reward(&self, ctx: &RewardContext<'_>) -> Credits;
}

/// The same amount for every successful request (the original's early 0.01).
#[derive(Clone, Copy, Debug)]
pub struct FlatReward(pub Credits);

impl Default for FlatReward {
    /// 0.01 credits per request, as the original paid.
    fn default() -> Self {
        FlatReward(Credits(10_000))
    }
}

impl RewardPolicy for FlatReward {
    fn reward(&self, _ctx: &RewardContext<'_>) -> Credits {
        self.0
    }
}

/// Another policy's reward scaled by the node's verification score
/// ([`RewardContext::verification_permille`]): a node canaries found wrong
/// earns less for what it still serves until it passes again, rounded down.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifiedReward<P>(pub P);

impl<P: RewardPolicy> RewardPolicy for VerifiedReward<P> {
    fn reward(&self, ctx: &RewardContext<'_>) -> Credits {
        let r = i128::from(self.0.reward(ctx).as_micros());
        let score = i128::from(ctx.verification_permille.min(1000));
        Credits(i64::try_from(r * score / 1000).unwrap_or(i64::MAX))
    }
}

/// A fixed share of what the user paid, in basis points (1/100 of a percent):
/// `charged × bps / 10,000`, rounded down to a whole micro-credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevenueShare {
    bps: u32,
}

impl RevenueShare {
    /// All of it.
    pub const MAX_BPS: u32 = 10_000;

    /// A share of `bps` basis points (7,000 = 70 %). More than
    /// [`Self::MAX_BPS`] is refused: a provider never earns more than was paid.
    pub fn new(bps: u32) -> crate::Result<Self> {
        if bps > Self::MAX_BPS {
            return Err(crate::Error::InvalidInput(format!(
                "a revenue share of {bps} basis points is more than 100 %"
            )));
        }
        Ok(RevenueShare { bps })
    }

    /// The share in basis points.
    pub fn bps(&self) -> u32 {
        self.bps
    }
}

impl RewardPolicy for RevenueShare {
    fn reward(&self, ctx: &RewardContext<'_>) -> Credits {
        let charged = ctx.charged.as_micros().max(0) as u128;
        let r = charged * u128::from(self.bps) / u128::from(Self::MAX_BPS);
        Credits(i64::try_from(r).unwrap_or(i64::MAX))
    }
}

/// The original platform's last reward formula, exactly, in integers:
///
/// ```text
/// reward = (base[tier] × service × complexity(model)
///           + tokens × per_token[tier] × service)    (chat and embeddings only)
///          × latency factor
/// ```
///
/// * `base` and `per_token` per tier, in micro-credits (from 0.005 / 0.00001
///   credits at tier 1 to 0.075 / 0.00015 at tier 4);
/// * the service multiplier, per mille: chat 1,000, embeddings 300, scrape
///   200, tts 600, anything else (vision) 500;
/// * the model's complexity, per mille (see [`TieredReward::complexity_permille`]);
/// * tokens: input + output tokens for chat, input tokens for embeddings;
/// * the latency factor, per mille: 1,100 under 2 s, 900 over 10 s, else 1,000.
///
/// The exact product is rounded half up to a whole micro-credit once, at the
/// end (the original rounded to 6 decimals, i.e. to the micro-credit). Tiers
/// outside 1-4 are paid as the nearest tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TieredReward {
    /// Base reward per request per tier 1-4, in micro-credits.
    pub base: [i64; 4],
    /// Reward per token per tier 1-4, in micro-credits.
    pub per_token: [i64; 4],
    /// Model complexity overrides, per mille, by model name (whole, e.g.
    /// `llama3.1:8b`). Models not listed get [`TieredReward::complexity_permille`]'s default.
    pub complexity: HashMap<String, u32>,
}

impl Default for TieredReward {
    /// The original's tables: base 0.005 / 0.015 / 0.035 / 0.075 and per token
    /// 0.00001 / 0.00003 / 0.00007 / 0.00015 credits for tiers 1-4.
    fn default() -> Self {
        TieredReward {
            base: [5_000, 15_000, 35_000, 75_000],
            per_token: [10, 30, 70, 150],
            complexity: HashMap::new(),
        }
    }
}

impl TieredReward {
    /// Latency under this (ms) earns ×1.1.
    pub const FAST_MS: u64 = 2_000;
    /// Latency over this (ms) earns ×0.9.
    pub const SLOW_MS: u64 = 10_000;

    /// The service multiplier, per mille: chat 1,000, embeddings 300,
    /// scrape 200, tts 600, others 500.
    pub fn service_permille(service: Service) -> u32 {
        match service {
            Service::Chat => 1_000,
            Service::Embeddings => 300,
            Service::Scrape => 200,
            Service::Tts => 600,
            _ => 500,
        }
    }

    /// The latency factor, per mille.
    pub fn latency_permille(latency_ms: u64) -> u32 {
        if latency_ms < Self::FAST_MS {
            1_100
        } else if latency_ms > Self::SLOW_MS {
            900
        } else {
            1_000
        }
    }

    /// A model's complexity, per mille. An override in
    /// [`TieredReward::complexity`] wins; otherwise the size in the model's tag
    /// decides (`llama3.2:1b` → 1 billion parameters): up to 1B 1,000, up to
    /// 3B 1,200, up to 8B 1,500, up to 14B 2,000, larger 2,500; a name without
    /// a size (`nomic-embed-text`, `kokoro`) 1,000.
    ///
    /// The original names the factor but ORIGINAL.md carries no table for it;
    /// this one pays larger models more, in the spirit of its tiers.
    pub fn complexity_permille(&self, model: &str) -> u32 {
        if let Some(c) = self.complexity.get(model) {
            return *c;
        }
        match model_size_tenths_of_billion(model) {
            None => 1_000,
            Some(t) if t <= 10 => 1_000,
            Some(t) if t <= 30 => 1_200,
            Some(t) if t <= 80 => 1_500,
            Some(t) if t <= 140 => 2_000,
            Some(_) => 2_500,
        }
    }

    /// Sets a model's complexity (per mille).
    pub fn with_complexity(mut self, model: &str, permille: u32) -> Self {
        self.complexity.insert(model.to_owned(), permille);
        self
    }

    /// The tokens the token part pays for: chat input + output, embeddings
    /// input; other services have no token part.
    pub fn paid_tokens(service: Service, meter: Meter) -> u64 {
        match service {
            Service::Chat => meter.input_tokens.saturating_add(meter.output_tokens),
            Service::Embeddings => meter.input_tokens,
            _ => 0,
        }
    }
}

/// The parameter count in a model tag, in tenths of a billion, rounded up:
/// `llama3.2:3b` → 30, `qwen2.5:0.5b` → 5, `smollm:135m` → 2.
fn model_size_tenths_of_billion(model: &str) -> Option<u64> {
    let tag = model.rsplit_once(':')?.1.to_ascii_lowercase();
    // Tags like `7b-instruct-q4_0`: the size is the first part.
    let size = tag.split(['-', '_']).next()?;
    if let Some(millions) = size.strip_suffix('m') {
        let m: u64 = millions.parse().ok()?;
        return Some(m.div_ceil(100).max(1));
    }
    let billions = size.strip_suffix('b')?;
    let (whole, frac) = billions.split_once('.').unwrap_or((billions, ""));
    let whole: u64 = whole.parse().ok()?;
    let tenths = match frac.chars().next() {
        None => 0,
        Some(c) => u64::from(c.to_digit(10)?),
    };
    // Anything below the first decimal rounds the size up.
    let rest = frac.chars().skip(1).any(|c| c != '0');
    Some(
        whole
            .saturating_mul(10)
            .saturating_add(tenths)
            .saturating_add(u64::from(rest)),
    )
}

impl RewardPolicy for TieredReward {
    fn reward(&self, ctx: &RewardContext<'_>) -> Credits {
        let t = usize::from(ctx.tier.clamp(1, 4)) - 1;
        let svc = u128::from(Self::service_permille(ctx.service));
        let cx = u128::from(self.complexity_permille(ctx.model));
        let lat = u128::from(Self::latency_permille(ctx.latency_ms));
        let base = self.base[t].max(0) as u128;
        let rate = self.per_token[t].max(0) as u128;
        let tokens = u128::from(Self::paid_tokens(ctx.service, ctx.meter));
        // Everything in micro-credits × 10^-9 (three per-mille factors), then
        // one rounding: base × svc‰ × cx‰ × lat‰ + tokens × rate × svc‰ × lat‰ × 1000.
        let scaled = base * svc * cx * lat + tokens * rate * svc * lat * 1_000;
        let micros = (scaled + 500_000_000) / 1_000_000_000;
        Credits(i64::try_from(micros).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(
        service: Service,
        model: &str,
        tier: u8,
        tokens: (u64, u64),
        ms: u64,
    ) -> RewardContext<'_> {
        RewardContext {
            service,
            model,
            tier,
            meter: Meter {
                input_tokens: tokens.0,
                output_tokens: tokens.1,
                units: 0,
            },
            latency_ms: ms,
            charged: Credits(1_000_000),
            verification_permille: 1000,
        }
    }

    #[test]
    fn model_sizes_are_read_from_tags() {
        assert_eq!(model_size_tenths_of_billion("llama3.2:1b"), Some(10));
        assert_eq!(model_size_tenths_of_billion("llama3.2:3b"), Some(30));
        assert_eq!(model_size_tenths_of_billion("qwen2.5:0.5b"), Some(5));
        assert_eq!(
            model_size_tenths_of_billion("qwen2.5:7b-instruct-q4_0"),
            Some(70)
        );
        assert_eq!(model_size_tenths_of_billion("smollm:135m"), Some(2));
        assert_eq!(model_size_tenths_of_billion("nomic-embed-text"), None);
        assert_eq!(model_size_tenths_of_billion("x:latest"), None);
    }

    #[test]
    fn tiered_follows_the_formula() {
        let p = TieredReward::default();
        // Tier 2, chat, 3B (1.2), 100 tokens, 1.5 s:
        // (15,000 × 1.0 × 1.2 + 100 × 30 × 1.0) × 1.1 = 23,100.
        assert_eq!(
            p.reward(&ctx(Service::Chat, "llama3.2:3b", 2, (60, 40), 1_500)),
            Credits(23_100)
        );
    }
}
