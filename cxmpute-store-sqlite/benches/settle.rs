//! Throughput of the money path on a real database file with `synchronous=FULL`:
//!
//! - `reserve_settle_pairs`: 20,000 requests, each reserved then settled,
//!   from 1,000 concurrent tasks (what the broker does per request);
//! - `settles`: 20,000 settlements of requests reserved beforehand (untimed),
//!   from 1,000 concurrent tasks;
//! - `held_batches`: 20,000 calls held in the broker's memory, settled in
//!   batches of [`HELD_BATCH`] one after the other, as the broker's group
//!   commit sends them under load (one batch in flight).
//!
//! Why 1,000 tasks: a gateway admitting 20,000 requests a second, each
//! taking 50 ms or more upstream, has at least that many in flight; and an
//! acknowledged write waits for its batch's fsync, so what one caller can do
//! alone is bounded by the disk's fsync latency, not by the store.
//!
//! Run with `cargo bench -p cxmpute-store-sqlite --bench settle`; criterion
//! reports elements (requests) per second. Under `cargo test` (no `--bench`
//! argument) each benchmark runs once on a small batch, as a smoke test.

// criterion_group! defines an undocumented public function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cxmpute_core::conformance::fixtures::{at, new_key, new_provider, new_user, T0};
use cxmpute_core::*;
use cxmpute_store_sqlite::SqliteStore;

const REQUESTS: usize = 20_000;
/// Requests per run when `cargo test` runs the benchmark as a test.
const SMOKE_REQUESTS: usize = 400;
const TASKS: usize = 1_000;
/// Calls per `settle_held` batch: about what a busy host's group commit
/// gathers with 32 connections.
const HELD_BATCH: usize = 32;

/// How many requests one run makes: the full figure only when benchmarking.
fn requests() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        REQUESTS
    } else {
        SMOKE_REQUESTS
    }
}

struct Fixture {
    store: Arc<SqliteStore>,
    /// The run's request ids, made as the broker makes them (in time order).
    ids: Vec<RequestId>,
    user: User,
    key: ApiKey,
    provider: Provider,
    _dir: tempfile::TempDir,
}

async fn fixture(n: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(dir.path().join("bench.db"))
        .await
        .expect("open");
    let user = new_user("bench@example.com", Credits::whole(1_000_000_000));
    store.create_user(&user).await.expect("user");
    // A limit, so every request moves the key's balance too.
    let key = ApiKey {
        name: "bench".into(),
        ..new_key(&user, Some(Credits::whole(1_000_000_000)), T0)
    };
    store.create_api_key(&key).await.expect("key");
    let provider = Provider {
        email: "node@example.com".into(),
        ..new_provider(None)
    };
    store.create_provider(&provider).await.expect("provider");
    Fixture {
        store: Arc::new(store),
        ids: (0..n).map(|_| RequestId::generate()).collect(),
        user,
        key,
        provider,
        _dir: dir,
    }
}

/// Request `i` of a run: its id is drawn in advance, so the timed phase of
/// `settles` can name what the untimed phase reserved.
fn reservation(f: &Fixture, i: usize) -> Reservation {
    Reservation {
        request_id: f.ids[i].clone(),
        user_id: f.user.id.clone(),
        key_id: f.key.id.clone(),
        route: Route::ChatCompletions,
        amount: Credits::micros(50_000),
        created_at: at(i as i64),
    }
}

fn settlement(f: &Fixture, r: &Reservation) -> Settlement {
    Settlement {
        request_id: r.request_id.clone(),
        charged: Credits::micros(31_337),
        reward: Some((f.provider.id.clone(), Credits::micros(21_000))),
        usage: UsageRecord {
            request_id: r.request_id.clone(),
            user_id: r.user_id.clone(),
            key_id: r.key_id.clone(),
            route: r.route,
            model: "llama3.2:3b".into(),
            provision_id: Some(ProvisionId::new("node_bench")),
            provider_id: Some(f.provider.id.clone()),
            input_tokens: 420,
            output_tokens: 137,
            units: 0,
            success: true,
            latency_ms: 900,
            app: Some("bench".into()),
            at: r.created_at,
            charged: Credits::ZERO,
            reward: Credits::ZERO,
            requested_model: None,
            cache_hit: false,
        },
    }
}

/// Runs `work(i)` for every `i < n`, spread over `TASKS` tasks.
async fn spread<W, Fut>(n: usize, work: W)
where
    W: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut tasks = Vec::with_capacity(TASKS);
    for t in 0..TASKS {
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                work(i).await;
                i += TASKS;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

/// One timed run on a fresh database: `prepare` (untimed) then `work` over
/// every request, spread over the tasks. Returns the time `work` took.
async fn timed_run<P, W, PF, WF>(n: usize, prepare: P, work: W) -> Duration
where
    P: Fn(Arc<Fixture>, usize) -> PF + Clone + Send + Sync + 'static,
    PF: std::future::Future<Output = ()> + Send,
    W: Fn(Arc<Fixture>, usize) -> WF + Clone + Send + Sync + 'static,
    WF: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(fixture(n).await);
    let g = f.clone();
    spread(n, move |i| prepare(g.clone(), i)).await;
    let g = f.clone();
    let start = Instant::now();
    spread(n, move |i| work(g.clone(), i)).await;
    let took = start.elapsed();
    close_balanced(&f, n).await;
    took
}

/// Checks that the books balance after a run of `n` requests (every one
/// settled, nothing held, the provider paid what the ledger rewarded) and
/// closes the file cleanly. Returns the ledger's totals.
async fn close_balanced(f: &Fixture, n: usize) -> LedgerTotals {
    let t = f.store.ledger_totals().await.expect("totals");
    let earned = f
        .store
        .provider(&f.provider.id)
        .await
        .expect("provider")
        .earnings;
    assert_eq!(t.rewarded, earned);
    assert_eq!(t.reserved, Credits::ZERO);
    assert_eq!(t.settlements, n as u64);
    f.store.close().await;
    t
}

/// One timed run of `held_batches` on a fresh database; the books balance
/// after it as after [`timed_run`].
async fn held_run(n: usize) -> Duration {
    let f = fixture(n).await;
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let r = reservation(&f, i);
            let st = settlement(&f, &r);
            (r, st)
        })
        .collect();
    let start = Instant::now();
    for batch in calls.chunks(HELD_BATCH) {
        let out = f.store.settle_held(batch).await.expect("settle_held");
        assert_eq!(out, vec![SettleOutcome::Applied; batch.len()]);
    }
    let took = start.elapsed();
    let t = close_balanced(&f, n).await;
    assert_eq!(t.charged, Credits(31_337 * n as i64));
    took
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let n = requests();

    let mut group = c.benchmark_group("sqlite");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    // Each iteration starts from an empty database file, so every sample
    // measures the same thing (the store's speed with the tables it has
    // after `n` requests), not a database that grows with the sample count.
    group.bench_function("reserve_settle_pairs", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += timed_run(
                    n,
                    |_, _| async {},
                    |f, i| async move {
                        let r = reservation(&f, i);
                        f.store.reserve(&r).await.expect("reserve");
                        let out = f.store.settle(&settlement(&f, &r)).await.expect("settle");
                        assert_eq!(out, SettleOutcome::Applied);
                    },
                )
                .await;
            }
            total
        })
    });

    group.bench_function("settles", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Reserve outside the clock, then time the settlements alone.
                total += timed_run(
                    n,
                    |f, i| async move {
                        f.store.reserve(&reservation(&f, i)).await.expect("reserve");
                    },
                    |f, i| async move {
                        // The same request the untimed phase reserved.
                        let r = reservation(&f, i);
                        let out = f.store.settle(&settlement(&f, &r)).await.expect("settle");
                        assert_eq!(out, SettleOutcome::Applied);
                    },
                )
                .await;
            }
            total
        })
    });

    group.bench_function("held_batches", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += held_run(n).await;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
