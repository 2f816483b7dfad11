//! Reserve + settle (the store's share of one proxied request) against the
//! DynamoDB-compatible server named by `CXMPUTE_TEST_DYNAMO_ENDPOINT`;
//! without it the benchmark prints a notice and measures nothing.
//!
//! ```text
//! CXMPUTE_TEST_DYNAMO_ENDPOINT=http://127.0.0.1:5055 \
//!     cargo bench -p cxmpute-store-dynamo --bench reserve_settle
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use cxmpute_core::conformance::fixtures::{new_key, new_provider, new_user, T0};
use cxmpute_core::secret::random_token;
use cxmpute_core::{
    ApiKey, Credits, LedgerStore, NetworkStore, Provider, RequestId, Reservation, Route,
    SettleOutcome, Settlement, UsageRecord, User, UserStore,
};
use cxmpute_store_dynamo::{DynamoConfig, DynamoStore, StaticCredentials};

struct Fixture {
    store: Arc<DynamoStore>,
    user: User,
    key: ApiKey,
    provider: Provider,
}

async fn fixture(endpoint: &str) -> Fixture {
    let cfg = DynamoConfig::new(format!("bench{}_", random_token(8).to_lowercase()))
        .with_endpoint(endpoint)
        .with_region("us-east-1")
        .with_credentials(StaticCredentials::new("testing", "testing"));
    let store = DynamoStore::connect(cfg).await.expect("connect");
    store.create_tables_if_missing().await.expect("table");
    let user = new_user("bench@users.test", Credits::whole(1_000_000_000));
    store.create_user(&user).await.expect("user");
    let key = ApiKey {
        name: "bench".into(),
        ..new_key(&user, Some(Credits::whole(1_000_000_000)), T0)
    };
    store.create_api_key(&key).await.expect("key");
    let provider = Provider {
        email: "bench@providers.test".into(),
        ..new_provider(None)
    };
    store.create_provider(&provider).await.expect("provider");
    Fixture {
        store: Arc::new(store),
        user,
        key,
        provider,
    }
}

/// One request's store calls: reserve the most it can cost, settle the actual.
async fn one_request(f: &Fixture) {
    let r = Reservation {
        request_id: RequestId::generate(),
        user_id: f.user.id.clone(),
        key_id: f.key.id.clone(),
        route: Route::ChatCompletions,
        amount: Credits::micros(2_000),
        created_at: T0,
    };
    f.store.reserve(&r).await.expect("reserve");
    let st = Settlement {
        request_id: r.request_id.clone(),
        charged: Credits::micros(1_234),
        reward: Some((f.provider.id.clone(), Credits::micros(900))),
        usage: UsageRecord {
            request_id: r.request_id.clone(),
            user_id: r.user_id.clone(),
            key_id: r.key_id.clone(),
            route: r.route,
            model: "llama3.2:3b".into(),
            provision_id: None,
            provider_id: Some(f.provider.id.clone()),
            input_tokens: 100,
            output_tokens: 200,
            units: 0,
            success: true,
            latency_ms: 250,
            app: None,
            at: T0,
            charged: Credits::ZERO,
            reward: Credits::ZERO,
            requested_model: None,
            cache_hit: false,
        },
    };
    assert_eq!(
        f.store.settle(&st).await.expect("settle"),
        SettleOutcome::Applied
    );
}

fn reserve_settle(c: &mut Criterion) {
    let Ok(endpoint) = std::env::var("CXMPUTE_TEST_DYNAMO_ENDPOINT") else {
        eprintln!(
            "reserve_settle: skipped, set CXMPUTE_TEST_DYNAMO_ENDPOINT to a \
             DynamoDB-compatible server to measure"
        );
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let f = Arc::new(rt.block_on(fixture(&endpoint)));

    let mut g = c.benchmark_group("dynamo");
    g.throughput(Throughput::Elements(1));
    g.bench_function("authenticate (api_key_by_hash)", |b| {
        b.to_async(&rt)
            .iter(|| async { f.store.api_key_by_hash(&f.key.hash).await.expect("key") })
    });
    // Each sample on a fresh table (made and dropped outside the timing):
    // an emulator that copies whole tables per transaction would otherwise
    // measure how much earlier samples left behind.
    g.bench_function("reserve + settle, one request", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let endpoint = endpoint.clone();
            async move {
                let f = fixture(&endpoint).await;
                let start = Instant::now();
                for _ in 0..iters {
                    one_request(&f).await;
                }
                let took = start.elapsed();
                f.store.delete_tables().await.expect("drop the table");
                took
            }
        })
    });
    g.finish();
    rt.block_on(f.store.delete_tables())
        .expect("drop the table");
}

// What `criterion_group!`/`criterion_main!` expand to, written out: the
// generated group function would carry no docs.
fn main() {
    // Few, short samples: a local emulator is slow to serve and the numbers
    // settle quickly.
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    reserve_settle(&mut c);
    c.final_summary();
}
