//! Routing speed: one node selection with each selector, and the pool index's
//! updates (a node joining, leaving, changing health), at pool sizes of 10,
//! 1,000 and 100,000 nodes. Both should be flat across sizes: selection is
//! O(1) and every update touches only the node's own entries.
//!
//! `cargo bench --bench routing`
//!
//! Updates are timed one operation at a time (`iter_custom`), so each figure
//! includes one clock read (tens of nanoseconds).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion};
use cxmpute_core::testkit::RoutingIndex;
use cxmpute_core::*;

const MODEL: &str = "llama3.2:3b";
const SIZES: [usize; 3] = [10, 1_000, 100_000];
const REGIONS: [&str; 4] = ["DE", "US", "FR", "JP"];

fn entry(i: usize) -> PoolEntry {
    PoolEntry {
        provision_id: ProvisionId::new(format!("node_{i:08}")),
        provider_id: ProviderId::new(format!("prv_{}", i % 97)),
        service: Service::Chat,
        model: MODEL.into(),
        endpoint: format!("http://10.0.{}.{}:11434", (i / 250) % 250, i % 250),
        node_secret: "secret".into(),
        tier: 3,
        region: REGIONS[i % REGIONS.len()].into(),
    }
}

/// A pool of `n` nodes with varied latencies, as a live pool would have.
fn pool(n: usize) -> RoutingIndex {
    let ix = RoutingIndex::new();
    for i in 0..n {
        let e = entry(i);
        let id = e.provision_id.clone();
        ix.upsert(&id, vec![e]);
        ix.observe(&id, 20_000 + (i as u64 * 7_919) % 200_000, true);
    }
    ix
}

fn selection(c: &mut Criterion) {
    let selectors: Vec<(&str, Arc<dyn ProvisionSelector>)> = vec![
        ("random", Arc::new(RandomSelector)),
        ("round_robin", Arc::new(RoundRobinSelector)),
        ("least_in_flight", Arc::new(LeastInFlightSelector)),
        ("peak_ewma", Arc::new(PeakEwmaSelector)),
    ];
    let mut g = c.benchmark_group("select");
    for n in SIZES {
        let ix = pool(n);
        for (name, sel) in &selectors {
            g.bench_with_input(BenchmarkId::new(*name, n), &n, |b, _| {
                b.iter(|| black_box(ix.select(Service::Chat, black_box(MODEL), sel.as_ref(), &[])))
            });
        }
        let de = RoutePreferences::region("DE");
        g.bench_with_input(BenchmarkId::new("peak_ewma_region", n), &n, |b, _| {
            b.iter(|| black_box(ix.select_with(Service::Chat, MODEL, &PeakEwmaSelector, &[], &de)))
        });
        // Failover: the second attempt of a request, one node excluded.
        let tried = [entry(0).provision_id];
        g.bench_with_input(
            BenchmarkId::new("peak_ewma_excluding_one", n),
            &n,
            |b, _| b.iter(|| black_box(ix.select(Service::Chat, MODEL, &PeakEwmaSelector, &tried))),
        );
    }
    g.finish();
}

fn updates(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_update");
    for n in SIZES {
        let ix = pool(n);
        let extra = entry(n + 1);
        let id = extra.provision_id.clone();
        g.bench_with_input(BenchmarkId::new("join", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let e = vec![extra.clone()];
                    let t = Instant::now();
                    ix.upsert(&id, e);
                    total += t.elapsed();
                    ix.remove(&id);
                }
                total
            })
        });
        g.bench_with_input(BenchmarkId::new("leave", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    ix.upsert(&id, vec![extra.clone()]);
                    let t = Instant::now();
                    ix.remove(&id);
                    total += t.elapsed();
                }
                total
            })
        });
        let member = entry(n / 2).provision_id;
        g.bench_with_input(BenchmarkId::new("health_change", n), &n, |b, _| {
            let mut healthy = true;
            b.iter(|| {
                healthy = !healthy;
                ix.set_healthy(&member, healthy);
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

/// The benchmark group. In a module of its own because the macro's
/// generated function carries no documentation.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group! {
        name = benches;
        config = super::config();
        targets = super::selection, super::updates
    }
}
criterion_main!(group::benches);
