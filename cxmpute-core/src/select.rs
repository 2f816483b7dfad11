//! Choosing a node from a pool: the [`ProvisionSelector`] trait and its
//! implementations.

use std::sync::Arc;

use rand::Rng;

use crate::pool::Node;
use crate::types::ProvisionId;

/// Picks one node of a pool for a request.
///
/// `nodes` are the pool's routable nodes (never empty when called through the
/// index); `excluded` are nodes already tried for this request (a handful at
/// most). Implementations must run in O(1) or O(log n) of the pool size.
pub trait ProvisionSelector: Send + Sync + 'static {
    /// The index in `nodes` of the chosen node, or `None` when every node is excluded.
    fn select(&self, nodes: &[Arc<Node>], excluded: &[ProvisionId]) -> Option<usize>;

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}

/// Whether node `i` may be chosen.
fn allowed(nodes: &[Arc<Node>], i: usize, excluded: &[ProvisionId]) -> bool {
    !excluded.contains(&nodes[i].entry.provision_id)
}

/// A uniformly random allowed index: a few random draws, then (only when
/// nearly everything is excluded) a scan from a random start.
pub(crate) fn random_allowed(
    rng: &mut impl Rng,
    nodes: &[Arc<Node>],
    excluded: &[ProvisionId],
) -> Option<usize> {
    let n = nodes.len();
    if n == 0 {
        return None;
    }
    for _ in 0..8 {
        let i = rng.random_range(0..n);
        if allowed(nodes, i, excluded) {
            return Some(i);
        }
    }
    // Only reached when most of a (then tiny) pool is excluded: bounded by
    // the number of attempts per request, not by the pool size in practice.
    let start = rng.random_range(0..n);
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| allowed(nodes, i, excluded))
}

/// Uniformly random choice: the original platform's behaviour.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomSelector;

impl ProvisionSelector for RandomSelector {
    fn select(&self, nodes: &[Arc<Node>], excluded: &[ProvisionId]) -> Option<usize> {
        random_allowed(&mut rand::rng(), nodes, excluded)
    }

    fn name(&self) -> &'static str {
        "random"
    }
}
