//! Paying providers: the [`RewardPolicy`] trait and its implementations.
//!
//! A policy sees one settled, successful request and returns what its
//! provider earns. The store clamps a reward to what the user was charged, so
//! the platform never pays out more for a request than it took in; the
//! platform keeps the rest.

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
