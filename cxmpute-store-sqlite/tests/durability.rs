//! What is written stays written: across a close and reopen, across a drop
//! without close, and a database that cannot be opened says so.

use std::path::Path;
use std::time::Duration;

use cxmpute_core::conformance::fixtures::{at, new_user, T0};
use cxmpute_core::secret::Secret;
use cxmpute_core::*;
use cxmpute_store_sqlite::{SqliteOptions, SqliteStore};
use serde_json::json;

struct World {
    user: User,
    key: ApiKey,
    provider: Provider,
    provision: Provision,
    entries: Vec<PoolEntry>,
    settled: Vec<UsageRecord>,
    open: Reservation,
    price: PriceEntry,
    notification: Notification,
    grant: CreditGrant,
}

/// Writes one of everything through `store` and returns what it wrote.
async fn populate(store: &SqliteStore) -> World {
    let user = User {
        id: UserId::generate(),
        email: "durable@example.com".into(),
        credits: Credits::whole(100),
        is_admin: true,
        suspended: None,
        created_at: T0,
        budget: None,
        alerts: Default::default(),
        alerted: Default::default(),
    };
    store.create_user(&user).await.unwrap();
    let grant = CreditGrant {
        user_id: user.id.clone(),
        amount: Credits::whole(5),
        by: "usr_admin".into(),
        reason: "welcome".into(),
        at: T0,
    };
    store.grant_credits(&grant).await.unwrap();
    let secret = Secret::generate_api_key();
    let key = ApiKey {
        id: ApiKeyId::generate(),
        user_id: user.id.clone(),
        hash: secret.hash(),
        name: "main".into(),
        prefix: secret.display_prefix(),
        credit_limit: Some(Credits::whole(50)),
        credits_left: Some(Credits::whole(50)),
        permitted_routes: vec![Route::ChatCompletions, Route::Embeddings],
        created_at: T0,
        last_used_at: None,
        revoked_at: None,
        rate_limits: RateLimits::default(),
        budget: None,
        cache: Default::default(),
    };
    store.create_api_key(&key).await.unwrap();
    let provider = Provider {
        id: ProviderId::generate(),
        user_id: Some(user.id.clone()),
        email: "node@example.com".into(),
        key_hash: Secret::generate_provider_key().hash(),
        earnings: Credits::ZERO,
        suspended: None,
        created_at: T0,
    };
    store.create_provider(&provider).await.unwrap();
    let provision = Provision {
        id: ProvisionId::generate(),
        provider_id: provider.id.clone(),
        endpoint: Some("http://node.example.com:8080".into()),
        node_secret: Secret::generate(32).expose().to_owned(),
        device: json!({"gpu": "RTX 4090", "vram_mb": 24576}),
        location: Location {
            country: "FR".into(),
            state: "IDF".into(),
            city: "Paris".into(),
        },
        tier: 4,
        state: ProvisionState::Ready,
        last_heartbeat: T0,
        created_at: T0,
    };
    let entries = vec![PoolEntry {
        provision_id: provision.id.clone(),
        provider_id: provider.id.clone(),
        service: Service::Chat,
        model: "llama3.2:3b".into(),
        endpoint: "http://node.example.com:8080".into(),
        node_secret: provision.node_secret.clone(),
        tier: 4,
        region: "FR".into(),
    }];
    store.create_provision(&provision, &entries).await.unwrap();

    let mut settled = Vec::new();
    for i in 0..10 {
        let r = Reservation {
            request_id: RequestId::generate(),
            user_id: user.id.clone(),
            key_id: key.id.clone(),
            route: Route::ChatCompletions,
            amount: Credits::whole(2),
            created_at: at(i),
        };
        store.reserve(&r).await.unwrap();
        let st = Settlement {
            request_id: r.request_id.clone(),
            charged: Credits::micros(1_000_000 + i),
            reward: Some((provider.id.clone(), Credits::micros(700_000))),
            usage: UsageRecord {
                request_id: r.request_id.clone(),
                user_id: user.id.clone(),
                key_id: key.id.clone(),
                route: r.route,
                model: "llama3.2:3b".into(),
                provision_id: Some(provision.id.clone()),
                provider_id: Some(provider.id.clone()),
                input_tokens: 10 + i as u64,
                output_tokens: 20,
                units: 0,
                success: true,
                latency_ms: 300,
                app: None,
                at: at(100 + i),
                charged: Credits::ZERO,
                reward: Credits::ZERO,
                requested_model: None,
                cache_hit: false,
            },
        };
        store.settle(&st).await.unwrap();
        settled.push(store.settlement(&r.request_id).await.unwrap());
    }
    let open = Reservation {
        request_id: RequestId::generate(),
        user_id: user.id.clone(),
        key_id: key.id.clone(),
        route: Route::Embeddings,
        amount: Credits::whole(3),
        created_at: at(500),
    };
    store.reserve(&open).await.unwrap();

    let price = PriceEntry {
        service: Service::Chat,
        model: Some("llama3.2:3b".into()),
        per_request: Credits::micros(100),
        per_million_input_tokens: Credits::whole(1),
        per_million_output_tokens: Credits::whole(2),
        per_million_units: Credits::ZERO,
    };
    store.put_price(&price).await.unwrap();
    let notification = Notification {
        id: NotificationId::generate(),
        title: "maintenance".into(),
        banner: "tonight".into(),
        popup: String::new(),
        starts_at: T0,
        ends_at: at(1),
        placements: vec![Placement::Homepage],
    };
    store.put_notification(&notification).await.unwrap();
    World {
        user,
        key,
        provider,
        provision,
        entries,
        settled,
        open,
        price,
        notification,
        grant,
    }
}

/// Checks that `store` holds exactly what `populate` wrote.
async fn assert_holds(store: &SqliteStore, w: &World) {
    let charged: i64 = w.settled.iter().map(|u| u.charged.0).sum();
    let rewarded: i64 = w.settled.iter().map(|u| u.reward.0).sum();
    assert_eq!(charged, 10_000_045);
    let user = store.user(&w.user.id).await.unwrap();
    assert_eq!(
        user.credits,
        Credits(Credits::whole(105).0 - charged - w.open.amount.0)
    );
    assert_eq!(store.user_by_email(&w.user.email).await.unwrap(), user);
    assert_eq!(
        store.credit_grants(&w.user.id).await.unwrap(),
        vec![w.grant.clone()]
    );

    let key = store.api_key_by_hash(&w.key.hash).await.unwrap();
    assert_eq!(
        key.credits_left,
        Some(Credits(Credits::whole(50).0 - charged - w.open.amount.0))
    );
    assert_eq!(key.permitted_routes, w.key.permitted_routes);
    assert_eq!(key.last_used_at, Some(w.open.created_at));

    let provider = store
        .provider_by_key_hash(&w.provider.key_hash)
        .await
        .unwrap();
    assert_eq!(provider.earnings, Credits(rewarded));
    assert_eq!(store.provider_by_user(&w.user.id).await.unwrap(), provider);
    assert_eq!(store.provision(&w.provision.id).await.unwrap(), w.provision);
    assert_eq!(store.pool_entries().await.unwrap(), w.entries);

    for u in &w.settled {
        assert_eq!(&store.settlement(&u.request_id).await.unwrap(), u);
    }
    let mut newest_first = w.settled.clone();
    newest_first.reverse();
    assert_eq!(
        store.usage_records(&w.user.id, 100).await.unwrap(),
        newest_first
    );
    let t = store.ledger_totals().await.unwrap();
    assert_eq!(t.settlements, 10);
    assert_eq!(t.charged, Credits(charged));
    assert_eq!(t.rewarded, Credits(rewarded));
    assert_eq!(t.reserved, w.open.amount);

    assert_eq!(store.prices().await.unwrap(), vec![w.price.clone()]);
    assert_eq!(
        store.notifications().await.unwrap(),
        vec![w.notification.clone()]
    );

    // The open reservation is still open: it settles now, once.
    let release = store.release_stale_reservations(at(501)).await;
    assert_eq!(release.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cxmpute.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let world = populate(&store).await;
    store.close().await;
    // A closed store refuses work instead of pretending.
    assert!(matches!(
        store.user(&world.user.id).await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        store.put_price(&world.price).await,
        Err(Error::Unavailable { .. })
    ));
    drop(store);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.path(), Some(path.as_path()));
    assert_holds(&store, &world).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_on_the_same_file_is_refused_while_the_first_lives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cxmpute.db");
    let first = SqliteStore::open(&path).await.unwrap();
    let e = SqliteStore::open(&path).await.unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e:?}");
    assert!(e.to_string().contains("one host owns a file"), "{e}");
    // The same file by another name is the same file.
    let other_name = dir.path().join(".").join("cxmpute.db");
    assert!(SqliteStore::open(&other_name).await.is_err());
    // A clone keeps it; the last one gone frees it.
    let clone = first.clone();
    drop(first);
    assert!(SqliteStore::open(&path).await.is_err());
    drop(clone);
    let again = SqliteStore::open(&path).await.unwrap();
    // Closing frees it at once, while clones still live (as in a broker's
    // tasks winding down), and two closes at once both wait for the writer.
    let (kept, other) = (again.clone(), again.clone());
    tokio::join!(again.close(), other.close());
    let third = SqliteStore::open(&path).await.unwrap();
    assert!(matches!(kept.flush().await, Err(Error::Unavailable { .. })));
    drop(kept);
    third.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_drop_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cxmpute.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let world = populate(&store).await;
    // No close: every write above was acknowledged, so it is committed.
    drop(store);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_holds(&store, &world).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_queued_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("cxmpute.db"))
        .await
        .unwrap();
    let mut writes = Vec::new();
    for i in 0..100 {
        let store = store.clone();
        writes.push(tokio::spawn(async move {
            store
                .record_stats(&StatsBatch {
                    id: format!("batch-{i}"),
                    deltas: vec![(
                        T0.day(),
                        "network".into(),
                        StatsCounters {
                            requests: 1,
                            ..StatsCounters::default()
                        },
                    )],
                })
                .await
        }));
    }
    // Every write that was queued before the flush is committed after it.
    for w in writes {
        w.await.unwrap().unwrap();
    }
    store.flush().await.unwrap();
    let stats = store.stats("network", T0.day(), T0.day()).await.unwrap();
    assert_eq!(stats[0].1.requests, 100);
    store.close().await;
    store.close().await; // twice is fine
}

fn assert_clear_open_error(e: Error, path: &Path) {
    let text = e.to_string();
    eprintln!("{text}");
    assert!(matches!(e, Error::Backend { .. }), "{e:?}");
    assert!(
        text.contains(&path.display().to_string()),
        "the error names the file: {text}"
    );
    assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
}

#[tokio::test]
async fn a_corrupt_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.db");
    std::fs::write(
        &path,
        b"this is not a database, just some bytes \x00\x01\x02".repeat(200),
    )
    .unwrap();
    let e = SqliteStore::open(&path).await.unwrap_err();
    assert_clear_open_error(e, &path);
    let text = SqliteStore::open(&path).await.unwrap_err().to_string();
    assert!(text.contains("not a database"), "says why: {text}");
}

#[tokio::test]
async fn an_unwritable_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where a directory should be: no permission bits
    // involved, so this fails for root too.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let path = blocker.join("cxmpute.db");
    let e = SqliteStore::open(&path).await.unwrap_err();
    assert_clear_open_error(e, &path);

    // A directory where the file should be.
    let e = SqliteStore::open(dir.path()).await.unwrap_err();
    assert_clear_open_error(e, dir.path());

    // A directory that does not exist is not created behind the caller's back.
    let missing = dir.path().join("missing").join("cxmpute.db");
    let e = SqliteStore::open(&missing).await.unwrap_err();
    assert_clear_open_error(e, &missing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_elsewhere_is_unavailable_then_clears() {
    use sqlx::ConnectOptions;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cxmpute.db");
    let options = SqliteOptions::default().busy_timeout(Duration::from_millis(50));
    let store = SqliteStore::open_with(&path, options).await.unwrap();
    // Another process takes the write lock (here: a connection of our own).
    let mut other = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .connect()
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();

    let user = new_user("locked@example.com", Credits::whole(1));
    let e = store.create_user(&user).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(e.is_retryable());
    // Reservations and settlements take the same path and fail the same way.
    let r = Reservation {
        request_id: RequestId::generate(),
        user_id: user.id.clone(),
        key_id: ApiKeyId::generate(),
        route: Route::ChatCompletions,
        amount: Credits::micros(1),
        created_at: T0,
    };
    let e = store.reserve(&r).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    // Reads go on beside the lock (WAL), and the refused write left nothing.
    assert!(matches!(
        store.user(&user.id).await,
        Err(Error::NotFound(_))
    ));

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    // The writer is not stuck: the same write now succeeds.
    store.create_user(&user).await.unwrap();
    assert_eq!(store.user(&user.id).await.unwrap(), user);
    store.close().await;
}
