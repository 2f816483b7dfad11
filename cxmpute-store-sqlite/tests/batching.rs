//! Writes queued together (and so likely applied in one batch, reservations
//! and settlements in one run) mean exactly what they would one at a time,
//! in queue order.
//!
//! `tokio::join!` polls its futures in order, and each store call queues its
//! write on its first poll, so the writes below reach the writer in the
//! order written whether or not they end up in the same batch.

use cxmpute_core::conformance::fixtures::{self, new_key, new_provider, new_user};
use cxmpute_core::*;
use cxmpute_store_sqlite::SqliteStore;

struct Fixture {
    store: SqliteStore,
    user: User,
    key: ApiKey,
    provider: Provider,
    _dir: tempfile::TempDir,
}

const DB: &str = "batching.db";

async fn fixture(credits: Credits, limit: Option<Credits>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join(DB)).await.unwrap();
    let user = new_user("batch@example.com", credits);
    store.create_user(&user).await.unwrap();
    let key = ApiKey {
        name: "k".into(),
        ..new_key(&user, limit, fixtures::T0)
    };
    store.create_api_key(&key).await.unwrap();
    let provider = Provider {
        email: "p@example.com".into(),
        ..new_provider(None)
    };
    store.create_provider(&provider).await.unwrap();
    Fixture {
        store,
        user,
        key,
        provider,
        _dir: dir,
    }
}

fn reservation(f: &Fixture, amount: Credits, at: i64) -> Reservation {
    Reservation {
        request_id: RequestId::generate(),
        user_id: f.user.id.clone(),
        key_id: f.key.id.clone(),
        route: Route::ChatCompletions,
        amount,
        created_at: fixtures::at(at),
    }
}

fn settlement(f: &Fixture, r: &Reservation, charged: Credits, reward: Credits) -> Settlement {
    Settlement {
        request_id: r.request_id.clone(),
        charged,
        reward: Some((f.provider.id.clone(), reward)),
        usage: UsageRecord {
            request_id: r.request_id.clone(),
            user_id: r.user_id.clone(),
            key_id: r.key_id.clone(),
            route: r.route,
            model: "m".into(),
            provision_id: None,
            provider_id: Some(f.provider.id.clone()),
            input_tokens: 1,
            output_tokens: 2,
            units: 0,
            success: true,
            latency_ms: 3,
            app: None,
            at: r.created_at,
            charged: Credits::ZERO,
            reward: Credits::ZERO,
            requested_model: None,
            cache_hit: false,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_between_reservations_applies_in_order() {
    let f = fixture(Credits::whole(10), None).await;
    let (r1, r2) = (
        reservation(&f, Credits::whole(1), 1),
        reservation(&f, Credits::whole(1), 2),
    );
    let (a, b, c) = tokio::join!(
        f.store.reserve(&r1),
        f.store.revoke_api_key(&f.key.id, fixtures::at(1)),
        f.store.reserve(&r2),
    );
    a.unwrap();
    b.unwrap();
    assert!(matches!(c, Err(Error::Unauthorized(_))), "{c:?}");
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::whole(9)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_before_a_reservation_funds_it() {
    let f = fixture(Credits::ZERO, None).await;
    let r = reservation(&f, Credits::whole(3), 1);
    let grant = CreditGrant {
        user_id: f.user.id.clone(),
        amount: Credits::whole(3),
        by: "usr_admin".into(),
        reason: "top-up".into(),
        at: fixtures::T0,
    };
    let (g, a) = tokio::join!(f.store.grant_credits(&grant), f.store.reserve(&r));
    assert_eq!(g.unwrap(), Credits::whole(3));
    a.unwrap();
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::ZERO
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_and_settle_queued_together_apply_both() {
    let f = fixture(Credits::whole(10), Some(Credits::whole(8))).await;
    let r = reservation(&f, Credits::whole(5), 1);
    let st = settlement(&f, &r, Credits::whole(2), Credits::whole(1));
    // The settlement is queued before the reservation is acknowledged.
    let (a, b, c) = tokio::join!(
        f.store.reserve(&r),
        f.store.settle(&st),
        f.store.settle(&st)
    );
    a.unwrap();
    assert_eq!(b.unwrap(), SettleOutcome::Applied);
    assert_eq!(c.unwrap(), SettleOutcome::AlreadySettled);
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::whole(8)
    );
    let key = f.store.api_key_by_hash(&f.key.hash).await.unwrap();
    assert_eq!(key.credits_left, Some(Credits::whole(6)));
    let t = f.store.ledger_totals().await.unwrap();
    assert_eq!(t.reserved, Credits::ZERO);
    assert_eq!(
        (t.settlements, t.charged, t.rewarded),
        (1, Credits::whole(2), Credits::whole(1))
    );
    // Nothing is left open to release.
    assert_eq!(
        f.store
            .release_stale_reservations(Timestamp(i64::MAX))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        f.store.provider(&f.provider.id).await.unwrap().earnings,
        Credits::whole(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_a_run_leave_the_rest_of_it_alone() {
    let f = fixture(Credits::whole(3), Some(Credits::whole(10))).await;
    let r1 = reservation(&f, Credits::whole(2), 1);
    let too_much = reservation(&f, Credits::whole(2), 2);
    let r3 = reservation(&f, Credits::whole(1), 3);
    let unknown = settlement(
        &f,
        &reservation(&f, Credits::whole(1), 4),
        Credits::ZERO,
        Credits::ZERO,
    );
    let (a, b, c, d, e) = tokio::join!(
        f.store.reserve(&r1),
        f.store.reserve(&too_much),
        f.store.reserve(&r1),
        f.store.settle(&unknown),
        f.store.reserve(&r3),
    );
    a.unwrap();
    assert!(matches!(b, Err(Error::InsufficientCredits(_))), "{b:?}");
    assert!(matches!(c, Err(Error::AlreadyExists(_))), "{c:?}");
    assert!(matches!(d, Err(Error::NotFound(_))), "{d:?}");
    e.unwrap();
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::ZERO
    );
    let key = f.store.api_key_by_hash(&f.key.hash).await.unwrap();
    assert_eq!(key.credits_left, Some(Credits::whole(7)));
    assert_eq!(
        f.store.ledger_totals().await.unwrap().reserved,
        Credits::whole(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_racing_a_stale_release_applies_once() {
    let f = fixture(Credits::whole(10), None).await;
    let r = reservation(&f, Credits::whole(4), 1);
    f.store.reserve(&r).await.unwrap();
    let st = settlement(&f, &r, Credits::whole(3), Credits::whole(2));
    let (released, settled) = tokio::join!(
        f.store.release_stale_reservations(fixtures::at(100)),
        f.store.settle(&st),
    );
    // Whichever the writer applied first settles the request; the other
    // finds it settled and changes nothing.
    let (released, settled) = (released.unwrap(), settled.unwrap());
    let charged = match (released, settled) {
        // The release came first: settled at zero cost.
        (1, SettleOutcome::AlreadySettled) => Credits::ZERO,
        // The settlement came first: there was nothing stale left.
        (0, SettleOutcome::Applied) => Credits::whole(3),
        other => panic!("settled twice or not at all: {other:?}"),
    };
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::whole(10).saturating_sub(charged)
    );
    let t = f.store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.settlements, t.charged, t.reserved),
        (1, charged, Credits::ZERO)
    );
}

/// A second connection to the fixture's file, which has planted a trigger
/// that refuses the usage rows of model `refused`, as a full disk or a
/// broken file would refuse the write.
async fn refuse_model(f: &Fixture) -> sqlx::SqliteConnection {
    use sqlx::Connection;

    let url = format!("sqlite://{}", f._dir.path().join(DB).display());
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE INSERT ON usage WHEN NEW.model = 'refused' \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&mut other)
    .await
    .unwrap();
    other
}

/// A batch that is one run of money operations begins its transaction with
/// the run's read and commits it with the run's write. When that write
/// fails, the run is undone and each of its callers told, and the writer
/// goes on; a lone run that writes nothing ends its transaction too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_run_whose_write_fails_is_undone_and_the_writer_goes_on() {
    use sqlx::Connection;

    let f = fixture(Credits::whole(10), None).await;
    refuse_model(&f).await.close().await.unwrap();

    // Held in the broker's memory: the store sees only the settlement.
    let hold = reservation(&f, Credits::whole(4), 1);
    let mut refused = settlement(&f, &hold, Credits::whole(3), Credits::whole(2));
    refused.usage.model = "refused".into();
    let failed = f.store.settle_held(&[(hold.clone(), refused)]).await;
    let e = failed.expect_err("the write was refused");
    assert!(format!("{e:?}").contains("refused by the test"), "{e:?}");
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::whole(10)
    );
    assert_eq!(f.store.ledger_totals().await.unwrap().settlements, 0);

    // Nothing of it stayed behind, not even an open transaction: the same
    // call settles now, and a repeat of it writes nothing.
    let st = settlement(&f, &hold, Credits::whole(3), Credits::whole(2));
    let list = [(hold.clone(), st)];
    let applied = f.store.settle_held(&list).await.unwrap();
    assert_eq!(applied, vec![SettleOutcome::Applied]);
    let repeat = f.store.settle_held(&list).await.unwrap();
    assert_eq!(repeat, vec![SettleOutcome::AlreadySettled]);
    // And a reservation after it takes the write lock as usual.
    f.store
        .reserve(&reservation(&f, Credits::whole(1), 2))
        .await
        .unwrap();
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::whole(6)
    );
    let t = f.store.ledger_totals().await.unwrap();
    assert_eq!(
        (t.settlements, t.charged, t.rewarded, t.reserved),
        (1, Credits::whole(3), Credits::whole(2), Credits::whole(1))
    );
    assert_eq!(
        f.store.provider(&f.provider.id).await.unwrap().earnings,
        Credits::whole(2)
    );
}

/// Settlements of unrelated calls queue together and are applied as one
/// run. When SQLite refuses one of them, the run is applied again one by
/// one: the refused call fails alone, and the others are settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_settlement_fails_alone_in_its_run() {
    use futures::poll;
    use sqlx::Connection;

    let f = fixture(Credits::whole(10), None).await;
    let mut other = refuse_model(&f).await;
    // The other connection holds the write lock, so the writer waits for it
    // while the settlements below queue up: they reach it together.
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();

    let calls: Vec<_> = (1..=4)
        .map(|i| {
            let hold = reservation(&f, Credits::whole(2), i);
            let mut st = settlement(&f, &hold, Credits::whole(1), Credits::ZERO);
            if i == 3 {
                st.usage.model = "refused".into();
            }
            [(hold, st)]
        })
        .collect();
    let mut settling: Vec<_> = calls
        .iter()
        .map(|list| Box::pin(f.store.settle_held(list)))
        .collect();
    // One poll queues each settlement with the writer, in order.
    for s in &mut settling {
        assert!(poll!(s.as_mut()).is_pending());
    }
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    other.close().await.unwrap();

    let mut outcomes = Vec::new();
    for s in settling {
        outcomes.push(s.await);
    }
    for (i, out) in outcomes.iter().enumerate() {
        match i {
            2 => {
                let e = out.as_ref().expect_err("the refused call fails");
                assert!(format!("{e:?}").contains("refused by the test"), "{e:?}");
            }
            _ => assert_eq!(out.as_ref().unwrap(), &vec![SettleOutcome::Applied]),
        }
    }
    assert_eq!(
        f.store.user(&f.user.id).await.unwrap().credits,
        Credits::whole(7)
    );
    let t = f.store.ledger_totals().await.unwrap();
    assert_eq!((t.settlements, t.charged), (3, Credits::whole(3)));
}
