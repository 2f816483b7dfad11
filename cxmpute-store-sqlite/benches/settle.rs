//! Throughput of the money path on a real database file with `synchronous=FULL`:
//!
//! - `reserve_settle_pairs`: 20,000 requests, each reserved then settled,
//!   from 1,000 concurrent tasks (what the broker does per request);
//! - `settles`: 20,000 settlements of requests reserved beforehand (untimed),
//!   from 1,000 concurrent tasks.
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
use cxmpute_core::secret::Secret;
use cxmpute_core::*;
use cxmpute_store_sqlite::SqliteStore;

const REQUESTS: usize = 20_000;
/// Requests per run when `cargo test` runs the benchmark as a test.
const SMOKE_REQUESTS: usize = 400;
const TASKS: usize = 1_000;

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
    user: User,
    key: ApiKey,
    provider: Provider,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(dir.path().join("bench.db"))
        .await
        .expect("open");
    let now = Timestamp(1_767_225_600_000);
    let user = User {
        id: UserId::generate(),
        email: "bench@example.com".into(),
        credits: Credits::whole(1_000_000_000),
        is_admin: false,
        suspended: None,
        created_at: now,
    };
    store.create_user(&user).await.expect("user");
    let secret = Secret::generate_api_key();
    let key = ApiKey {
        id: ApiKeyId::generate(),
        user_id: user.id.clone(),
        hash: secret.hash(),
        name: "bench".into(),
        prefix: secret.display_prefix(),
        // A limit, so every request moves the key's balance too.
        credit_limit: Some(Credits::whole(1_000_000_000)),
        credits_left: Some(Credits::whole(1_000_000_000)),
        permitted_routes: Vec::new(),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    };
    store.create_api_key(&key).await.expect("key");
    let provider = Provider {
        id: ProviderId::generate(),
        user_id: None,
        email: "node@example.com".into(),
        key_hash: Secret::generate_provider_key().hash(),
        earnings: Credits::ZERO,
        suspended: None,
        created_at: now,
    };
    store.create_provider(&provider).await.expect("provider");
    Fixture {
        store: Arc::new(store),
        user,
        key,
        provider,
        _dir: dir,
    }
}

fn reservation(f: &Fixture, i: usize) -> Reservation {
    Reservation {
        request_id: RequestId::generate(),
        user_id: f.user.id.clone(),
        key_id: f.key.id.clone(),
        route: Route::ChatCompletions,
        amount: Credits::micros(50_000),
        created_at: Timestamp(1_767_225_600_000 + i as i64),
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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let f = Arc::new(rt.block_on(fixture()));
    let n = requests();

    let mut group = c.benchmark_group("sqlite");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    group.bench_function("reserve_settle_pairs", |b| {
        b.to_async(&rt).iter(|| {
            let f = f.clone();
            async move {
                spread(n, move |i| {
                    let f = f.clone();
                    async move {
                        let r = reservation(&f, i);
                        f.store.reserve(&r).await.expect("reserve");
                        let st = settlement(&f, &r);
                        let out = f.store.settle(&st).await.expect("settle");
                        assert_eq!(out, SettleOutcome::Applied);
                    }
                })
                .await
            }
        })
    });

    group.bench_function("settles", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let f = f.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Reserve outside the clock, then time the settlements alone.
                    let pending: Vec<Reservation> = (0..n).map(|i| reservation(&f, i)).collect();
                    let pending = Arc::new(pending);
                    let (f2, p2) = (f.clone(), pending.clone());
                    spread(n, move |i| {
                        let (f, p) = (f2.clone(), p2.clone());
                        async move { f.store.reserve(&p[i]).await.expect("reserve") }
                    })
                    .await;
                    let start = Instant::now();
                    let (f2, p2) = (f.clone(), pending.clone());
                    spread(n, move |i| {
                        let (f, p) = (f2.clone(), p2.clone());
                        async move {
                            let out = f
                                .store
                                .settle(&settlement(&f, &p[i]))
                                .await
                                .expect("settle");
                            assert_eq!(out, SettleOutcome::Applied);
                        }
                    })
                    .await;
                    total += start.elapsed();
                }
                total
            }
        })
    });
    group.finish();

    // The books still balance after everything the benchmark did.
    rt.block_on(async {
        let t = f.store.ledger_totals().await.expect("totals");
        let earned = f
            .store
            .provider(&f.provider.id)
            .await
            .expect("provider")
            .earnings;
        assert_eq!(t.rewarded, earned);
        assert_eq!(t.reserved, Credits::ZERO);
        f.store.close().await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
