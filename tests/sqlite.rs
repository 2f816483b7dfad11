//! The host on SQLite, the facade's default store: state written through the
//! HTTP API is all there after a clean restart on the same file, and flows
//! whose correctness rests on the store's atomic operations hold where calls
//! running at once really interleave.
//!
//! Here rather than beside core's tests because core does not depend on a
//! store crate; the helpers are core's tests' own.

use std::collections::HashSet;
use std::sync::Arc;

use cxmpute::sqlite::SqliteStore;
use cxmpute_core::testkit::{StandInNode, TestHost, MODEL};
use cxmpute_core::*;
use serde_json::{json, Value};

#[path = "../cxmpute-core/tests/common/mod.rs"]
mod common;
use common::{
    call, expect_error, host_on, listed, request_code, sign_in, verify, ProviderApi,
    RecordingMailer,
};

fn temp_db() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cxmpute-restart-{}.db", secret::random_token(12)))
}

/// A streamed chat call, read to its end (a stream is settled before its body ends).
async fn chat(h: &TestHost, key: &Secret) -> reqwest::StatusCode {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", h.url))
        .bearer_auth(key.expose())
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    r.bytes().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_written_through_the_host_survives_a_clean_restart() {
    let path = temp_db();
    let node = StandInNode::start("a").await;

    // First life: a user, a provider with a node, credits, calls, stats.
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let h = TestHost::start(store.clone()).await;
    let (user, key) = h.user(Credits::whole(3)).await;
    h.broker
        .admin()
        .grant_credits(&user.id, Credits::whole(2), "admin", "welcome")
        .await
        .unwrap();
    let (provider, provider_key) = h.provider().await;
    let node_id = h.add_node(&provider, &node, Service::Chat, MODEL).await;
    for _ in 0..3 {
        assert_eq!(chat(&h, &key).await, 200);
    }
    h.broker.shutdown().await.unwrap();
    let before_user = h.broker.store().user(&user.id).await.unwrap();
    let before_provider = h.broker.store().provider(&provider.id).await.unwrap();
    let before_totals = h.broker.store().ledger_totals().await.unwrap();
    let before_usage = h.broker.store().usage_records(&user.id, 10).await.unwrap();
    let day = h.clock.now().day();
    let before_stats = h
        .broker
        .store()
        .stats(&format!("user:{}", user.id), day, day)
        .await
        .unwrap();
    assert_eq!(before_usage.len(), 3);
    assert_eq!(before_totals.settlements, 3);
    assert!(!before_stats.is_empty());

    // Second life on the same file.
    let (h, store) = second_life(h, store, &path).await;
    let s = h.broker.store();
    assert_eq!(s.user(&user.id).await.unwrap(), before_user);
    assert_eq!(s.provider(&provider.id).await.unwrap(), before_provider);
    assert_eq!(s.ledger_totals().await.unwrap(), before_totals);
    assert_eq!(s.usage_records(&user.id, 10).await.unwrap(), before_usage);
    assert_eq!(
        s.stats(&format!("user:{}", user.id), day, day)
            .await
            .unwrap(),
        before_stats
    );
    assert_eq!(s.credit_grants(&user.id).await.unwrap().len(), 1);
    assert_eq!(
        s.provision(&node_id).await.unwrap().provider_id,
        provider.id
    );
    // The keys still work, and the node is routable again without re-registering.
    assert!(h
        .broker
        .sessions()
        .authenticate_provider(Some(&provider_key))
        .await
        .is_ok());
    assert_eq!(chat(&h, &key).await, 200);
    assert_eq!(s.ledger_totals().await.unwrap().settlements, 4);
    drop(h);
    store.close().await;
    remove_db(&path);
}

#[tokio::test]
async fn key_changes_made_on_the_host_apply_at_once_on_sqlite_too() {
    let h = TestHost::start(Arc::new(SqliteStore::in_memory().await.unwrap())).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    common::key_changes_apply_at_once(&h).await;
}

/// A host on a SQLite file it owns: calls held in memory, settlements alone
/// written, on a file as the default host runs.
async fn file_host() -> (TestHost, std::path::PathBuf) {
    let path = temp_db();
    let store = SqliteStore::open(&path).await.unwrap();
    assert!(store.owned_by_one_host());
    (TestHost::start(Arc::new(store)).await, path)
}

fn remove_db(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Stops `h` and closes `store` (every write committed), then starts a new
/// host on the same file: the host's second life.
async fn second_life(
    h: TestHost,
    store: Arc<SqliteStore>,
    path: &std::path::Path,
) -> (TestHost, Arc<SqliteStore>) {
    drop(h);
    store.close().await;
    drop(store);
    let store = Arc::new(SqliteStore::open(path).await.unwrap());
    (TestHost::start(store.clone()).await, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_calls_against_credits_for_fifty_serve_fifty_on_sqlite() {
    let (h, path) = file_host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    common::fifty_of_200_calls_are_served(&h).await;
    drop(h);
    remove_db(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_at_once_on_one_key_never_overspend_its_limit_on_sqlite() {
    let (h, path) = file_host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    common::a_key_limit_holds_under_calls_at_once(&h).await;
    drop(h);
    remove_db(&path);
}

#[tokio::test]
async fn grants_limits_suspensions_and_revocations_apply_at_once_on_sqlite() {
    let (h, path) = file_host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    common::money_changes_apply_at_once(&h, &node).await;
    drop(h);
    remove_db(&path);
}

/// The store's atomic operations are what make codes single-use, sign-ups
/// unique and refresh tokens one-shot: the same flow on SQLite.

#[tokio::test]
async fn codes_sign_ups_and_refresh_rotation_hold_on_sqlite_too() {
    let store = cxmpute::sqlite::SqliteStore::in_memory().await.unwrap();
    let outbox = RecordingMailer::default();
    let h = host_on(Arc::new(store), Arc::new(outbox.clone())).await;

    let acc = h.broker.accounts();
    let email = "lite@users.test";
    let all = futures::future::join_all((0..8).map(|_| acc.ensure_account(email))).await;
    let ids: HashSet<UserId> = all.into_iter().map(|u| u.unwrap().id).collect();
    assert_eq!(ids.len(), 1);

    assert_eq!(request_code(&h, email).await.status(), 202);
    let code = outbox.last_code(email);
    let wrong = if code == "00000000" {
        "11111111"
    } else {
        "00000000"
    };
    for _ in 0..5 {
        assert_eq!(verify(&h, email, wrong).await.status(), 401);
    }
    assert_eq!(verify(&h, email, &code).await.status(), 401);

    let s1 = sign_in(&h, &outbox, email).await;
    assert!(ids.contains(&s1.user_id));
    let (a, b) = tokio::join!(
        call(&h, "POST", "/v1/auth/refresh")
            .json(json!({"refresh_token": s1.refresh_token.expose()}))
            .send(),
        call(&h, "POST", "/v1/auth/refresh")
            .json(json!({"refresh_token": s1.refresh_token.expose()}))
            .send()
    );
    let mut st = [a.status().as_u16(), b.status().as_u16()];
    st.sort();
    assert_eq!(st, [200, 401], "one refresh wins");
    let r = call(&h, "POST", "/v1/auth/refresh")
        .json(json!({"refresh_token": s1.refresh_token.expose()}))
        .send()
        .await;
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_may_hold_at_most_the_cap_of_nodes_even_registering_all_at_once() {
    // On SQLite, where registrations running at once interleave in the store.
    let path =
        std::env::temp_dir().join(format!("cxmpute-node-cap-{}.db", secret::random_token(12)));
    let store = Arc::new(cxmpute::sqlite::SqliteStore::open(&path).await.unwrap());
    let h = TestHost::start(store.clone()).await;
    let (_, key) = h.provider().await;
    let a = ProviderApi::new(&h, &key);

    // Forty registrations at once: never more than the cap get in, and each
    // refusal says why.
    let all = futures::future::join_all((0..40).map(|_| a.post("", Some(json!({}))))).await;
    let mut admitted = 0;
    for r in all {
        if r.status() == 200 {
            admitted += 1;
        } else {
            let m = expect_error(r, 403, "forbidden").await;
            assert!(m.contains("at most 32"), "{m}");
        }
    }
    assert!(admitted <= 32, "{admitted} nodes admitted");
    assert_eq!(listed(&a).await, admitted);

    // One at a time up to the cap, then refused; ended nodes still count
    // (they are kept and may start again).
    for _ in admitted..32 {
        assert_eq!(a.post("", Some(json!({}))).await.status(), 200);
    }
    let ids: Vec<String> = a
        .get("")
        .await
        .json::<Value>()
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["provision_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 32);
    assert_eq!(
        a.post(&format!("/{}/end", ids[0]), None).await.status(),
        204
    );
    let m = expect_error(a.post("", Some(json!({}))).await, 403, "forbidden").await;
    assert!(m.contains("at most 32"), "{m}");
    assert_eq!(listed(&a).await, 32);

    // Another provider is not affected; deleting a node makes room.
    let (_, other) = h.provider().await;
    let b = ProviderApi::new(&h, &other);
    assert_eq!(b.post("", Some(json!({}))).await.status(), 200);
    assert_eq!(a.delete(&format!("/{}", ids[0])).await.status(), 204);
    assert_eq!(a.post("", Some(json!({}))).await.status(), 200);
    assert_eq!(listed(&a).await, 32);
    drop(h);
    store.close().await;
    remove_db(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_and_its_pools_survive_a_restart() {
    let path = temp_db();
    let node = StandInNode::start("tiny").await;
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let h = TestHost::start(store.clone()).await;
    let builtin = network::Catalogue::original().models().len();
    // A model added and one removed through the admin API; a node serves
    // the new one.
    h.offer(Service::Chat, "tiny:0.5b").await;
    h.broker
        .admin()
        .delete_catalogue_model(Service::Chat, "codellama:7b")
        .await
        .unwrap();
    let (p, _) = h.provider().await;
    let id = h.add_node(&p, &node, Service::Chat, "tiny:0.5b").await;
    let catalogue = h.broker.admin().catalogue();
    assert_eq!(catalogue.len(), builtin);

    // Second life on the same file: the same catalogue, the node routed.
    let (h, store) = second_life(h, store, &path).await;
    assert_eq!(h.broker.admin().catalogue(), catalogue);
    assert!(h.is_routable(&id));
    let (_, key) = h.user(Credits::whole(1)).await;
    let body = json!({"model": "tiny:0.5b", "messages": [{"role": "user", "content": "hi"}]});
    let r = h.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    h.assert_ledger().await;
    drop(h);
    store.close().await;
    remove_db(&path);
}

/// The commits in a database's log since the log last started over (frames
/// that end a transaction carry the database's size, and the log's current
/// salt), and that salt, so a test can tell the log did not start over.
fn log_commits(db: &std::path::Path) -> (usize, Vec<u8>) {
    let wal = std::fs::read(format!("{}-wal", db.display())).unwrap();
    let page = u32::from_be_bytes(wal[8..12].try_into().unwrap()) as usize;
    let salt = wal[16..24].to_vec();
    let commits = wal[32..]
        .chunks_exact(24 + page)
        .filter(|frame| frame[8..16] == salt[..] && frame[4..8] != [0; 4])
        .count();
    (commits, salt)
}

/// Calls at once on a SQLite host settle in group commits: each call's
/// settlement goes to the store as it comes, and the store's writer commits
/// those that queued up together in one transaction. Far fewer commits than
/// calls, every call charged, rewarded and recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_at_once_settle_in_group_commits_on_sqlite() {
    use sqlx::Connection;

    let path = temp_db();
    let sqlite = SqliteStore::open(&path).await.unwrap();
    let store = Arc::new(cxmpute_core::testkit::InstrumentedStore::wrap(sqlite));
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    common::price_per_call(&h).await;
    let (user, key) = h.user(Credits::whole(1)).await;
    store.take_calls();
    let (before, salt) = log_commits(&path);
    // A commit takes a while, as on a slow disk: another connection holds
    // the write lock until every call's settlement waits for the writer.
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let release = async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
        while store.peak_in_flight("settle_held") < 100 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    };
    let (by_status, ()) = tokio::join!(common::calls_at_once(&h, &key, 100), release);
    assert_eq!(by_status, [(200, 100)].into_iter().collect());
    assert_eq!(store.take_calls()["settle_held"], 100);
    let (after, salt_after) = log_commits(&path);
    assert_eq!(salt_after, salt, "the log started over");
    assert!(
        after - before <= 10,
        "{} commits for 100 calls",
        after - before
    );
    assert_eq!(h.balance(&user.id).await, Credits(1_000_000 - 100_000));
    let t = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!((t.settlements, t.charged), (100, Credits(100_000)));
    h.assert_ledger().await;
    other.close().await.unwrap();
    drop(h);
    remove_db(&path);
}

/// A key's budget and what it spent this day are in the file: after a
/// restart the day's spending still counts, and the next day starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budgets_spending_survives_a_restart() {
    let path = temp_db();
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    common::price_per_call(&h).await;
    let (user, key) = h.user(Credits::whole(1)).await;
    let id = h.broker.store().api_keys(&user.id).await.unwrap()[0]
        .id
        .clone();
    // Three calls of 1,000 a day.
    let r = call(&h, "PATCH", format!("/v1/admin/keys/{id}"))
        .bearer(h.admin_key.expose())
        .json(json!({"budget": {"limit": 3_000, "period": "day"}}))
        .send()
        .await;
    assert_eq!(r.status(), 200);
    for _ in 0..2 {
        assert_eq!(chat(&h, &key).await, 200);
    }
    let now = h.clock.now();
    h.assert_ledger().await;

    // Second life, the same day: one call left of the budget.
    let (h, store) = second_life(h, store, &path).await;
    h.clock.set(now);
    h.track_user(&user.id, Credits::whole(1));
    assert_eq!(chat(&h, &key).await, 200);
    let r = h.post("/v1/chat/completions", &key, &common::chat()).await;
    expect_error(r, 429, "budget_exceeded").await;
    // The next day, three more.
    h.clock.advance(std::time::Duration::from_secs(86_400));
    for _ in 0..3 {
        assert_eq!(chat(&h, &key).await, 200);
    }
    assert_eq!(chat(&h, &key).await, 429);
    h.assert_ledger().await;
    assert_eq!(
        h.balance(&user.id).await,
        Credits::whole(1).saturating_sub(Credits(6_000))
    );
    drop(h);
    store.close().await;
    remove_db(&path);
}

/// An account's budget, its alerts, the alert marks taken and what the
/// account spent this day are in the file: after a restart the day's
/// spending still counts over all its keys, the budget alert is not mailed
/// again that day, and the next day starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_budget_and_alert_marks_survive_a_restart() {
    let path = temp_db();
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let h = TestHost::start(store.clone()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    common::price_per_call(&h).await;
    let (user, key) = h.user(Credits::whole(1)).await;
    let (_, key2) = (h.broker.admin())
        .create_api_key(&user.id, "second", None, Vec::new())
        .await
        .unwrap();
    // Three calls of 1,000 a day, over both keys; mailed at half of it.
    let r = call(&h, "PATCH", format!("/v1/admin/users/{}", user.id))
        .bearer(h.admin_key.expose())
        .json(json!({"budget": {"limit": 3_000, "period": "day"},
            "alerts": {"budget_percent": 50}}))
        .send()
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(chat(&h, &key).await, 200);
    assert_eq!(chat(&h, &key2).await, 200);
    h.alerts_done().await;
    let now = h.clock.now();
    let marked = h.broker.store().user(&user.id).await.unwrap().alerted;
    let day = Timestamp(now.0 - now.0.rem_euclid(86_400_000));
    assert_eq!(marked.budget, Some(day), "the budget alert was taken");
    h.assert_ledger().await;

    // Second life, the same day: one call left of the budget.
    let (h, store) = second_life(h, store, &path).await;
    h.clock.set(now);
    h.track_user(&user.id, Credits::whole(1));
    let u = h.broker.store().user(&user.id).await.unwrap();
    assert_eq!(u.alerts.budget_percent, Some(50));
    assert_eq!(u.alerted, marked);
    assert_eq!(chat(&h, &key2).await, 200);
    h.alerts_done().await;
    let r = h.post("/v1/chat/completions", &key, &common::chat()).await;
    let msg = expect_error(r, 429, "budget_exceeded").await;
    assert!(msg.contains("account's budget of 3000"), "{msg}");
    assert_eq!(
        h.broker.store().user(&user.id).await.unwrap().alerted,
        marked
    );
    // The next day, three more; the alert is taken for the new day.
    h.clock.advance(std::time::Duration::from_secs(86_400));
    for k in [&key, &key2, &key] {
        assert_eq!(chat(&h, k).await, 200);
    }
    assert_eq!(chat(&h, &key2).await, 429);
    h.alerts_done().await;
    let u = h.broker.store().user(&user.id).await.unwrap();
    assert_eq!(u.alerted.budget, Some(Timestamp(day.0 + 86_400_000)));
    h.assert_ledger().await;
    assert_eq!(
        h.balance(&user.id).await,
        Credits::whole(1).saturating_sub(Credits(6_000))
    );
    drop(h);
    store.close().await;
    remove_db(&path);
}
