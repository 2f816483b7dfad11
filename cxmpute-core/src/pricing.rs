//! Prices per service and model, and what a request costs.
//!
//! A request's cost is `per_request` plus input tokens, output tokens and
//! other units at per-million rates, each part rounded up to a whole
//! micro-credit. The broker reserves the cost of a request's *upper bounds*
//! (prompt bytes as input tokens, an image as a flat figure, the output
//! limit times the choices asked for as output tokens) and settles the cost
//! of what was actually metered, never more than it reserved.

use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::pool::{service_slot, ByModel};
use crate::types::{Credits, PriceEntry, Service};

/// What a request consumed (or may consume, as an upper bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// Prompt / input tokens.
    pub input_tokens: u64,
    /// Completion / output tokens.
    pub output_tokens: u64,
    /// Other units: TTS characters, scraped URLs, images.
    pub units: u64,
}

impl Meter {
    /// Each field clamped to the same field of `bound`: nodes are not trusted
    /// to report more than the request could have used.
    pub(crate) fn clamp_to(self, bound: Meter) -> Meter {
        Meter {
            input_tokens: self.input_tokens.min(bound.input_tokens),
            output_tokens: self.output_tokens.min(bound.output_tokens),
            units: self.units.min(bound.units),
        }
    }
}

fn per_million(count: u64, rate: Credits) -> i64 {
    if rate.0 <= 0 || count == 0 {
        return 0;
    }
    let p = u128::from(count) * rate.0 as u128;
    let c = p.div_ceil(1_000_000);
    i64::try_from(c).unwrap_or(i64::MAX)
}

/// What a request costs at a price. A trait because [`PriceEntry`] is one of
/// the API's types (defined in `cxmpute-api`, shared with the client) while
/// costing belongs to the broker; `price.cost(m)` reads as before.
pub(crate) trait Cost {
    /// The cost of `m` at this price, rounded up per part.
    fn cost(&self, m: Meter) -> Credits;

    /// The cost of what was delivered of a request that failed part-way: the
    /// metered tokens and units, without the per-request fee.
    fn partial_cost(&self, m: Meter) -> Credits;
}

impl Cost for PriceEntry {
    fn cost(&self, m: Meter) -> Credits {
        cost_with(self, self.per_request, m)
    }

    fn partial_cost(&self, m: Meter) -> Credits {
        cost_with(self, Credits::ZERO, m)
    }
}

/// [`Cost::cost`] with `per_request` as the fee.
fn cost_with(p: &PriceEntry, per_request: Credits, m: Meter) -> Credits {
    let parts = [
        per_request.0.max(0),
        per_million(m.input_tokens, p.per_million_input_tokens),
        per_million(m.output_tokens, p.per_million_output_tokens),
        per_million(m.units, p.per_million_units),
    ];
    Credits(parts.into_iter().fold(0i64, |a, b| a.saturating_add(b)))
}

/// The default price list, used for any service and model without a stored price.
///
/// | service | per request | per 1M input tokens | per 1M output tokens | per 1M units |
/// |---|---|---|---|---|
/// | chat | 0 | 0.10 | 0.20 | 0 |
/// | embeddings | 0 | 0.02 | 0 | 0 |
/// | tts | 0 | 0 | 0 | 15 (characters) |
/// | scrape | 0 | 0 | 0 | 1,000 (0.001 per URL) |
/// | vision | 0.001 | 0 | 0 | 0 |
pub fn default_prices() -> Vec<PriceEntry> {
    let p = |service, req, inp, out, units| PriceEntry {
        service,
        model: None,
        per_request: Credits(req),
        per_million_input_tokens: Credits(inp),
        per_million_output_tokens: Credits(out),
        per_million_units: Credits(units),
    };
    vec![
        p(Service::Chat, 0, 100_000, 200_000, 0),
        p(Service::Embeddings, 0, 20_000, 0, 0),
        p(Service::Tts, 0, 0, 0, 15_000_000),
        p(Service::Scrape, 0, 0, 0, 1_000_000_000),
        p(Service::Vision, 1_000, 0, 0, 0),
    ]
}

/// The price list in memory: stored prices over the defaults, looked up without
/// a store read on the request path, and without allocating: per service an
/// array slot, per model a map looked up by `&str`, entries shared by `Arc`.
#[derive(Debug, Default)]
pub struct PriceTable {
    prices: RwLock<[ServicePrices; Service::ALL.len()]>,
}

/// The prices of one service: its default and its models' own.
#[derive(Debug, Default)]
struct ServicePrices {
    default: Option<Arc<PriceEntry>>,
    models: ByModel<Arc<PriceEntry>>,
}

impl PriceTable {
    /// A table holding `defaults`, then `stored` over them.
    pub(crate) fn new(defaults: Vec<PriceEntry>, stored: Vec<PriceEntry>) -> Self {
        let t = PriceTable::default();
        for p in defaults.into_iter().chain(stored) {
            t.set(p);
        }
        t
    }

    /// Sets one price (in memory only: [`crate::admin::Admin::put_price`]
    /// stores one and sets it here).
    pub(crate) fn set(&self, p: PriceEntry) {
        let mut t = self.prices.write();
        let sp = &mut t[service_slot(p.service)];
        match p.model.clone() {
            Some(m) => {
                sp.models.insert(m, Arc::new(p));
            }
            None => sp.default = Some(Arc::new(p)),
        }
    }

    /// The price for a model: its own, else its service's default, else free.
    pub fn get(&self, service: Service, model: &str) -> Arc<PriceEntry> {
        let t = self.prices.read();
        let sp = &t[service_slot(service)];
        sp.models
            .get(model)
            .or(sp.default.as_ref())
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(PriceEntry {
                    service,
                    model: None,
                    per_request: Credits::ZERO,
                    per_million_input_tokens: Credits::ZERO,
                    per_million_output_tokens: Credits::ZERO,
                    per_million_units: Credits::ZERO,
                })
            })
    }

    /// Every price, sorted by service and model.
    pub fn all(&self) -> Vec<PriceEntry> {
        let t = self.prices.read();
        let mut v: Vec<PriceEntry> = t
            .iter()
            .flat_map(|sp| sp.default.iter().chain(sp.models.values()))
            .map(|p| PriceEntry::clone(p))
            .collect();
        v.sort_by(|a, b| (a.service, &a.model).cmp(&(b.service, &b.model)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_each_part_up() {
        let p = PriceEntry {
            service: Service::Chat,
            model: None,
            per_request: Credits(5),
            per_million_input_tokens: Credits(1),
            per_million_output_tokens: Credits(3_000_000),
            per_million_units: Credits::ZERO,
        };
        let m = Meter {
            input_tokens: 1,
            output_tokens: 2,
            units: 9,
        };
        // 5 + ceil(1e-6) + 6
        assert_eq!(p.cost(m), Credits(12));
        assert_eq!(p.partial_cost(m), Credits(7));
        assert_eq!(p.cost(Meter::default()), Credits(5));
    }

    #[test]
    fn huge_counts_saturate_instead_of_wrapping() {
        let p = PriceEntry {
            service: Service::Chat,
            model: None,
            per_request: Credits(i64::MAX),
            per_million_input_tokens: Credits(i64::MAX),
            per_million_output_tokens: Credits::ZERO,
            per_million_units: Credits::ZERO,
        };
        let m = Meter {
            input_tokens: u64::MAX,
            output_tokens: 0,
            units: 0,
        };
        assert_eq!(p.cost(m), Credits(i64::MAX));
    }

    #[test]
    fn model_price_overrides_service_default() {
        let mut special = default_prices()[0].clone();
        special.model = Some("llama3.2:3b".into());
        special.per_request = Credits(42);
        let t = PriceTable::new(default_prices(), vec![special]);
        assert_eq!(t.get(Service::Chat, "llama3.2:3b").per_request, Credits(42));
        assert_eq!(t.get(Service::Chat, "other").per_request, Credits(0));
    }
}
