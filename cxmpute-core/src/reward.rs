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
//! | [`PlatformShare`] (the default) | the charge less the platform's share, per service, per mille |
//! | [`FlatReward`] | the same amount per request (the original's early 0.01) |
//! | [`TieredReward`] | the original's last formula: by node tier, service, model size, tokens and latency |
//!
//! Money is integer micro-credits throughout; factors are integer per-mille
//! (1,000 = ×1.0) and the one rounding happens at the end.

use std::collections::{BTreeMap, HashMap};

use crate::pricing::Meter;
use crate::types::{Credits, Service};
use crate::wire::RewardPolicyView;

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

    /// The policy as an administrator sees it (`GET /v1/admin/reward`).
    /// Without an override: `custom`, with no figures.
    fn describe(&self) -> RewardPolicyView {
        RewardPolicyView {
            policy: "custom".into(),
            platform_share_permille: BTreeMap::new(),
            description: "a reward policy of the embedder's own".into(),
        }
    }
}

/// The default: the provider earns the charge less the platform's share,
/// which is set per service in integer per mille (200 ‰ = the platform
/// keeps 20 %).
///
/// Rounding: `reward = ⌊charge × (1000 − share) / 1000⌋`, so the platform's
/// part of each charge, `charge − reward = ⌈charge × share / 1000⌉`, is never
/// below its exact share and above it by less than one micro-credit. A
/// reward is never negative and never more than the charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformShare {
    default_permille: u32,
    per_service: BTreeMap<Service, u32>,
}

impl Default for PlatformShare {
    /// The platform keeps [`PlatformShare::DEFAULT_PERMILLE`] of every service's charges.
    fn default() -> Self {
        PlatformShare {
            default_permille: Self::DEFAULT_PERMILLE,
            per_service: BTreeMap::new(),
        }
    }
}

impl PlatformShare {
    /// All of it.
    pub const MAX_PERMILLE: u32 = 1_000;
    /// The default share: 200 ‰, 20 %.
    pub const DEFAULT_PERMILLE: u32 = 200;

    fn check(permille: u32) -> crate::Result<u32> {
        if permille > Self::MAX_PERMILLE {
            return Err(crate::Error::InvalidInput(format!(
                "a platform share of {permille} per mille is more than 100 %"
            )));
        }
        Ok(permille)
    }

    /// The platform keeps `permille` of every charge (more than
    /// [`Self::MAX_PERMILLE`] is refused).
    pub fn new(permille: u32) -> crate::Result<Self> {
        Ok(PlatformShare {
            default_permille: Self::check(permille)?,
            per_service: BTreeMap::new(),
        })
    }

    /// The platform keeps `permille` of `service`'s charges.
    pub fn with_service(mut self, service: Service, permille: u32) -> crate::Result<Self> {
        self.per_service.insert(service, Self::check(permille)?);
        Ok(self)
    }

    /// The share of `service`'s charges the platform keeps, per mille.
    pub fn share_permille(&self, service: Service) -> u32 {
        (self.per_service.get(&service).copied()).unwrap_or(self.default_permille)
    }

    /// The provider's part of `charged` for `service` (the rounding rule above).
    pub fn provider_part(&self, service: Service, charged: Credits) -> Credits {
        let charged = charged.as_micros().max(0) as u128;
        let keep = u128::from(Self::MAX_PERMILLE - self.share_permille(service));
        let r = charged * keep / u128::from(Self::MAX_PERMILLE);
        Credits(i64::try_from(r).unwrap_or(i64::MAX))
    }
}

impl RewardPolicy for PlatformShare {
    fn reward(&self, ctx: &RewardContext<'_>) -> Credits {
        self.provider_part(ctx.service, ctx.charged)
    }

    fn describe(&self) -> RewardPolicyView {
        RewardPolicyView {
            policy: "platform_share".into(),
            platform_share_permille: Service::ALL
                .iter()
                .map(|s| (*s, self.share_permille(*s)))
                .collect(),
            description: "the provider earns the charge less the platform's share, \
                          rounded down to a micro-credit"
                .into(),
        }
    }
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

    fn describe(&self) -> RewardPolicyView {
        RewardPolicyView {
            policy: "flat".into(),
            platform_share_permille: BTreeMap::new(),
            description: format!(
                "{} micro-credits per successful request, at most the charge",
                self.0.as_micros()
            ),
        }
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

    fn describe(&self) -> RewardPolicyView {
        let mut view = self.0.describe();
        view.description
            .push_str(", scaled by the node's verification score (per mille)");
        view
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

    fn describe(&self) -> RewardPolicyView {
        RewardPolicyView {
            policy: "tiered".into(),
            platform_share_permille: BTreeMap::new(),
            description: "the original's formula: by node tier, service, model size, \
                          tokens and latency, at most the charge"
                .into(),
        }
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
    fn platform_share_rounds_the_reward_down() {
        let p = PlatformShare::default()
            .with_service(Service::Embeddings, 333)
            .unwrap()
            .with_service(Service::Tts, 0)
            .unwrap()
            .with_service(Service::Scrape, 1_000)
            .unwrap();
        let part = |s, c| p.provider_part(s, Credits(c)).as_micros();
        // 20 % of 1,004 is 200.8: the provider gets 803, the platform 201.
        assert_eq!(part(Service::Chat, 1_004), 803);
        assert_eq!(part(Service::Chat, 4), 3);
        assert_eq!(part(Service::Chat, 1), 0);
        assert_eq!(part(Service::Chat, 0), 0);
        assert_eq!(part(Service::Chat, -5), 0, "never negative");
        assert_eq!(part(Service::Embeddings, 1_000), 667);
        assert_eq!(
            part(Service::Tts, 999),
            999,
            "share 0: all of it, never more"
        );
        assert_eq!(part(Service::Scrape, 999), 0);
        assert_eq!(part(Service::Vision, i64::MAX), 7_378_697_629_483_820_645);
        for c in 0..5_000_i64 {
            for s in Service::ALL {
                let r = part(s, c);
                let share = i64::from(p.share_permille(s));
                // platform = charge − reward = ⌈charge × share / 1000⌉.
                assert_eq!(c - r, (c * share + 999) / 1_000, "{s} {c}");
                assert!((0..=c).contains(&r));
            }
        }
        assert!(PlatformShare::new(1_001).is_err());
        assert!(PlatformShare::default()
            .with_service(Service::Chat, 1_001)
            .is_err());
        let view = p.describe();
        assert_eq!(view.policy, "platform_share");
        assert_eq!(view.platform_share_permille[&Service::Chat], 200);
        assert_eq!(view.platform_share_permille[&Service::Embeddings], 333);
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
