//! What the conformance suite cannot see: several hosts sharing one table,
//! the number of calls on the hot path, an unreachable database, and the
//! DynamoDB-specific limits (transaction size, chunked stats batches).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::config::interceptors::BeforeSerializationInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept};
use aws_sdk_dynamodb::operation::get_item::GetItemInput;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsInput;
use cxmpute_core::error::BoxError;
use cxmpute_core::{
    ApiKey, ApiKeyId, Credits, Day, Error, LedgerStore, NetworkStore, PoolEntry, Provider,
    ProviderId, Provision, ProvisionId, ProvisionState, RequestId, Reservation, Route, Service,
    SettleOutcome, Settlement, StatsBatch, StatsCounters, StatsStore, Store, Timestamp,
    UsageRecord, User, UserId, UserStore,
};
use cxmpute_store_dynamo::{DynamoConfig, DynamoStore, StaticCredentials};

use cxmpute_core::conformance::fixtures::{at, new_key, new_provider, new_user, T0};

async fn funded(store: &dyn Store, credits: Credits, limit: Option<Credits>) -> (User, ApiKey) {
    let email = format!("{}@users.test", cxmpute_core::secret::random_token(10)).to_lowercase();
    let user = new_user(&email, credits);
    store.create_user(&user).await.expect("create user");
    let key = new_key(&user, limit, T0);
    store.create_api_key(&key).await.expect("create key");
    (user, key)
}

async fn provider(store: &dyn Store) -> Provider {
    let p = Provider {
        email: "p@providers.test".into(),
        ..new_provider(None)
    };
    store.create_provider(&p).await.expect("create provider");
    p
}

fn reservation(user: &User, key: &ApiKey, amount: Credits, t: Timestamp) -> Reservation {
    Reservation {
        request_id: RequestId::generate(),
        user_id: user.id.clone(),
        key_id: key.id.clone(),
        route: Route::ChatCompletions,
        amount,
        created_at: t,
    }
}

fn settlement(
    r: &Reservation,
    charged: Credits,
    reward: Option<(ProviderId, Credits)>,
) -> Settlement {
    Settlement {
        request_id: r.request_id.clone(),
        charged,
        reward: reward.clone(),
        usage: UsageRecord {
            request_id: r.request_id.clone(),
            user_id: r.user_id.clone(),
            key_id: r.key_id.clone(),
            route: r.route,
            model: "llama3.2:3b".into(),
            provision_id: None,
            provider_id: reward.map(|(p, _)| p),
            input_tokens: 10,
            output_tokens: 20,
            units: 0,
            success: true,
            latency_ms: 100,
            app: None,
            at: Timestamp(r.created_at.0 + 1),
            charged: Credits::ZERO,
            reward: Credits::ZERO,
            requested_model: None,
            cache_hit: false,
        },
    }
}

async fn balance(store: &dyn Store, u: &User) -> Credits {
    store.user(&u.id).await.expect("user").credits
}

/// Two hosts of one deployment: two stores (two clients, two caches) on one table.
async fn two_hosts(endpoint: &str) -> (Arc<DynamoStore>, Arc<DynamoStore>) {
    let cfg = common::config(endpoint);
    let a = common::store_on(cfg.clone()).await;
    let b = common::store_on(cfg).await;
    (Arc::new(a), Arc::new(b))
}

/// Nobody listens on the endpoint: every call fails fast with `Unavailable`
/// (the host answers 503), never a panic, never a hang.
#[tokio::test]
async fn unreachable_endpoint_is_unavailable() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut cfg = DynamoConfig::new("unreachable_")
        .with_endpoint(format!("http://127.0.0.1:{closed}"))
        .with_region("us-east-1")
        .with_credentials(StaticCredentials::new("testing", "testing"));
    cfg.max_attempts = 2;
    cfg.initial_backoff = Duration::from_millis(10);
    let store = DynamoStore::connect(cfg)
        .await
        .expect("connect makes no call");
    let user = UserId::generate();
    let key = ApiKeyId::generate();
    let r = Reservation {
        request_id: RequestId::generate(),
        user_id: user.clone(),
        key_id: key,
        route: Route::ChatCompletions,
        amount: Credits::whole(1),
        created_at: T0,
    };
    // A guard against a hang, far above what the configured timeouts allow.
    let guard = Duration::from_secs(60);
    let res = tokio::time::timeout(guard, store.user(&user)).await;
    let e = res.expect("no hang").expect_err("nothing is listening");
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(e.is_retryable());
    assert!(
        std::error::Error::source(&e).is_some(),
        "the SDK error is kept"
    );
    let res = tokio::time::timeout(guard, store.reserve(&r)).await;
    let e = res.expect("no hang").expect_err("nothing is listening");
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    let res = tokio::time::timeout(guard, store.create_tables_if_missing()).await;
    let e = res.expect("no hang").expect_err("nothing is listening");
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
}

/// Counts the DynamoDB operations a client makes (one per call, however
/// many attempts the SDK made), by operation name.
#[derive(Debug, Default)]
struct CallCounter {
    calls: Mutex<Vec<String>>,
    total: AtomicUsize,
}

#[derive(Debug, Clone)]
struct Counting(Arc<CallCounter>);

impl Intercept for Counting {
    fn name(&self) -> &'static str {
        "CallCounter"
    }

    fn read_before_execution(
        &self,
        ctx: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let input = ctx.input();
        let op = if input.downcast_ref::<GetItemInput>().is_some() {
            "GetItem"
        } else if input.downcast_ref::<TransactWriteItemsInput>().is_some() {
            "TransactWriteItems"
        } else {
            "other"
        };
        self.0.calls.lock().expect("lock").push(op.to_owned());
        self.0.total.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The hot path: authenticating is one read, admitting one transaction,
/// settling one transaction; a settlement arriving at another host adds
/// one read.
#[tokio::test]
async fn hot_path_is_one_call_to_admit_and_one_to_settle() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let cfg = common::config(&endpoint);
    // Set the table up with an ordinary store, then count with another.
    let setup = common::store_on(cfg.clone()).await;
    let (user, key) = funded(&setup, Credits::whole(100), Some(Credits::whole(50))).await;
    let p = provider(&setup).await;

    let counter = Arc::new(CallCounter::default());
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(&endpoint)
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&shared)
            .interceptor(Counting(counter.clone()))
            .build(),
    );
    let host = DynamoStore::with_client(client.clone(), cfg.clone()).expect("store");
    let other = DynamoStore::with_client(client, cfg).expect("store");
    let calls = || counter.total.load(Ordering::SeqCst);

    let k = host.api_key_by_hash(&key.hash).await.expect("authenticate");
    assert_eq!(k.id, key.id);
    assert_eq!(calls(), 1, "authenticate: one read");

    let r = reservation(&user, &key, Credits::whole(2), at(1));
    let before = calls();
    host.reserve(&r).await.expect("reserve");
    assert_eq!(calls() - before, 1, "admit: one transaction");

    let before = calls();
    let st = settlement(
        &r,
        Credits::whole(1),
        Some((p.id.clone(), Credits::micros(500_000))),
    );
    assert_eq!(
        host.settle(&st).await.expect("settle"),
        SettleOutcome::Applied
    );
    assert_eq!(calls() - before, 1, "settle: one transaction");

    // Reserved on one host, settled on another: the settling host reads the
    // reservation first.
    let r2 = reservation(&user, &key, Credits::whole(2), at(2));
    host.reserve(&r2).await.expect("reserve");
    let before = calls();
    let st2 = settlement(&r2, Credits::whole(1), None);
    assert_eq!(
        other.settle(&st2).await.expect("settle"),
        SettleOutcome::Applied
    );
    assert_eq!(
        calls() - before,
        2,
        "settle elsewhere: one read, one transaction"
    );

    let ops = counter.calls.lock().expect("lock").clone();
    assert!(
        ops.iter()
            .all(|o| o == "GetItem" || o == "TransactWriteItems"),
        "{ops:?}"
    );
    assert_eq!(balance(&setup, &user).await, Credits::whole(98));
}

/// Fifty concurrent reservations spread over two hosts never spend more than
/// the balance, and settling them all on the other host adds up exactly.
#[tokio::test]
async fn concurrent_reserves_on_two_hosts_never_overspend() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let (a, b) = two_hosts(&endpoint).await;
    let (user, key) = funded(a.as_ref(), Credits::whole(20), Some(Credits::whole(30))).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let host = if i % 2 == 0 { a.clone() } else { b.clone() };
        let r = reservation(&user, &key, Credits::whole(1), at(i));
        tasks.push(tokio::spawn(async move {
            let res = host.reserve(&r).await;
            (r, res)
        }));
    }
    let mut held = Vec::new();
    let mut short = 0;
    for t in tasks {
        let (r, res) = t.await.expect("task");
        match res {
            Ok(()) => held.push(r),
            Err(Error::InsufficientCredits(_)) => short += 1,
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert_eq!((held.len(), short), (20, 30));
    assert_eq!(balance(a.as_ref(), &user).await, Credits::ZERO);

    // Each settled by the host that did not take it, all at once.
    let mut tasks = Vec::new();
    for (i, r) in held.into_iter().enumerate() {
        let host = if i % 2 == 0 { b.clone() } else { a.clone() };
        tasks.push(tokio::spawn(async move {
            host.settle(&settlement(&r, Credits::micros(250_000), None))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.expect("task").expect("settle"),
            SettleOutcome::Applied
        );
    }
    let totals = a.ledger_totals().await.expect("totals");
    assert_eq!(totals.settlements, 20);
    assert_eq!(totals.charged, Credits::whole(5));
    assert_eq!(totals.reserved, Credits::ZERO);
    assert_eq!(balance(b.as_ref(), &user).await, Credits::whole(15));
    let k = b.api_key_by_hash(&key.hash).await.expect("key");
    assert_eq!(k.credits_left, Some(Credits::whole(25)));
}

/// A host that still remembers a reservation another host settled (or
/// released) does not settle it again: its settle is `AlreadySettled`.
#[tokio::test]
async fn settle_is_once_even_with_a_stale_memory_of_the_reservation() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let (a, b) = two_hosts(&endpoint).await;
    let (user, key) = funded(a.as_ref(), Credits::whole(10), None).await;

    let r = reservation(&user, &key, Credits::whole(4), at(1));
    a.reserve(&r).await.expect("reserve on a");
    let st = settlement(&r, Credits::whole(1), None);
    assert_eq!(
        b.settle(&st).await.expect("settle on b"),
        SettleOutcome::Applied
    );
    assert_eq!(
        a.settle(&st).await.expect("settle on a"),
        SettleOutcome::AlreadySettled
    );

    let r2 = reservation(&user, &key, Credits::whole(4), at(2));
    a.reserve(&r2).await.expect("reserve on a");
    assert_eq!(
        b.release_stale_reservations(at(3)).await.expect("release"),
        1
    );
    let st2 = settlement(&r2, Credits::whole(4), None);
    assert_eq!(
        a.settle(&st2).await.expect("settle on a"),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(balance(a.as_ref(), &user).await, Credits::whole(9));
    let t = a.ledger_totals().await.expect("totals");
    assert_eq!(
        (t.settlements, t.charged, t.reserved),
        (2, Credits::whole(1), Credits::ZERO)
    );
}

/// A key revoked by one host stops working on another at once, although
/// that host remembers the key's owner.
#[tokio::test]
async fn revocation_on_one_host_stops_the_key_on_another() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let (a, b) = two_hosts(&endpoint).await;
    let (user, key) = funded(a.as_ref(), Credits::whole(10), None).await;
    a.reserve(&reservation(&user, &key, Credits::whole(1), at(1)))
        .await
        .expect("reserve before revocation");
    b.revoke_api_key(&key.id, at(2)).await.expect("revoke");
    let e = a
        .reserve(&reservation(&user, &key, Credits::whole(1), at(3)))
        .await
        .expect_err("revoked");
    assert!(matches!(e, Error::Unauthorized(_)), "{e:?}");
    assert_eq!(balance(a.as_ref(), &user).await, Credits::whole(9));
}

/// A reward to a provider that does not exist is recorded (usage, totals)
/// but creates no provider.
#[tokio::test]
async fn reward_to_an_unknown_provider_creates_nothing() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let store = common::fresh_store(&endpoint).await;
    let (user, key) = funded(&store, Credits::whole(10), None).await;
    let r = reservation(&user, &key, Credits::whole(3), at(1));
    store.reserve(&r).await.expect("reserve");
    let ghost = ProviderId::generate();
    let st = settlement(
        &r,
        Credits::whole(2),
        Some((ghost.clone(), Credits::whole(1))),
    );
    assert_eq!(
        store.settle(&st).await.expect("settle"),
        SettleOutcome::Applied
    );
    assert!(matches!(
        store.provider(&ghost).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(
        store.settlement(&r.request_id).await.expect("usage").reward,
        Credits::whole(1)
    );
    let t = store.ledger_totals().await.expect("totals");
    assert_eq!(
        (t.charged, t.rewarded),
        (Credits::whole(2), Credits::whole(1))
    );
    assert_eq!(balance(&store, &user).await, Credits::whole(8));
}

/// A batch larger than one transaction is applied in chunks, each once: the
/// batch retried adds nothing.
#[tokio::test]
async fn large_stats_batch_applies_once() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let store = common::fresh_store(&endpoint).await;
    let d0 = Day::from_ymd(2026, 2, 1).expect("date");
    let one = StatsCounters {
        requests: 1,
        latency_buckets: vec![0, 1],
        charged: 3,
        ..StatsCounters::default()
    };
    let deltas: Vec<_> = (0..130)
        .map(|i| (d0.plus_days(i % 5), format!("user:u{i:03}"), one.clone()))
        .collect();
    let batch = StatsBatch {
        id: "host:big".into(),
        deltas,
    };
    store.record_stats(&batch).await.expect("record");
    store.record_stats(&batch).await.expect("record again");
    let sums = store
        .stats_by_prefix("user:", d0, d0.plus_days(10))
        .await
        .expect("by prefix");
    assert_eq!(sums.len(), 130);
    assert!(sums.iter().all(|(_, c)| *c == one), "each added once");
    assert_eq!(
        store
            .stats("user:u007", d0, d0.plus_days(4))
            .await
            .expect("stats"),
        vec![(d0.plus_days(2), one)]
    );
}

/// More pool entries than one transaction can hold are refused whole.
#[tokio::test]
async fn too_many_pool_entries_are_refused_whole() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let store = common::fresh_store(&endpoint).await;
    let p = provider(&store).await;
    let node = Provision {
        id: ProvisionId::generate(),
        provider_id: p.id.clone(),
        endpoint: None,
        node_secret: "s".into(),
        device: serde_json::json!({}),
        location: Default::default(),
        tier: 1,
        state: ProvisionState::Registered,
        last_heartbeat: T0,
        created_at: T0,
    };
    store.create_provision(&node, &[]).await.expect("register");
    let entries: Vec<PoolEntry> = (0..120)
        .map(|i| PoolEntry {
            provision_id: node.id.clone(),
            provider_id: p.id.clone(),
            service: Service::Chat,
            model: format!("model-{i}"),
            endpoint: "http://n.test".into(),
            node_secret: "s".into(),
            tier: 1,
            region: String::new(),
        })
        .collect();
    let e = store
        .update_provision(
            &node.id,
            ProvisionState::Ready,
            Some("http://n.test".into()),
            &entries,
        )
        .await
        .expect_err("too many");
    assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
    assert!(store.pool_entries().await.expect("pool").is_empty());
    assert_eq!(
        store.provision(&node.id).await.expect("node").state,
        ProvisionState::Registered
    );
    store
        .update_provision(&node.id, ProvisionState::Ready, None, &entries[..90])
        .await
        .expect("90 fit");
    assert_eq!(store.pool_entries().await.expect("pool").len(), 90);
}

/// Creating the table twice is fine (several hosts start at once).
#[tokio::test]
async fn create_tables_if_missing_is_idempotent() {
    let Some(endpoint) = common::dynamo_endpoint() else {
        return;
    };
    let store = common::fresh_store(&endpoint).await;
    store.create_tables_if_missing().await.expect("again");
    let (user, _) = funded(&store, Credits::whole(1), None).await;
    assert_eq!(balance(&store, &user).await, Credits::whole(1));
    store.delete_tables().await.expect("delete");
    store.delete_tables().await.expect("delete twice");
}
