//! Spending budgets per key over real sockets: set by the key's owner and
//! by an admin, a call whose reservation does not fit what is left of the
//! day's or month's budget refused with 429 `budget_exceeded` before
//! anything is held or forwarded, holds corrected to the charge at
//! settlement, and the budget starting again with the next UTC day or month
//! on the test clock.

use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::TestHost;
use cxmpute_core::wire::*;
use cxmpute_core::*;
use serde_json::{json, Value};

use crate::common::{self, call, chat, expect_error, sign_in, MODEL};

const DAY_MS: i64 = 86_400_000;

/// What a `chat()` call holds at admission (1,000 a request, the body's
/// bytes as its input estimate at 1 each, 5 output tokens at 2 each) and
/// what it is charged (the stand-in node reports 10 in, 5 out).
fn hold_and_charge() -> (i64, i64) {
    let body = serde_json::to_vec(&chat()).unwrap().len() as i64;
    (1_000 + body + 10, 1_000 + 10 + 10)
}

async fn admin_patch(h: &TestHost, id: &ApiKeyId, body: Value) -> reqwest::Response {
    call(h, "PATCH", format!("/v1/admin/keys/{id}"))
        .bearer(h.admin_key.expose())
        .json(body)
        .send()
        .await
}

/// Calls until one is refused: how many were admitted, and the refusal.
async fn calls_until_refused(h: &TestHost, key: &Secret) -> (usize, reqwest::Response) {
    for admitted in 0..100 {
        let r = h.post("/v1/chat/completions", key, &chat()).await;
        if r.status() != 200 {
            return (admitted, r);
        }
        r.bytes().await.unwrap();
    }
    panic!("a budget never refused");
}

/// Milliseconds from `now` to the start of the next UTC month.
fn to_next_month(now: Timestamp) -> i64 {
    let (y, m, _) = now.day().ymd();
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    i64::from(Day::from_ymd(y, m, 1).unwrap().0) * DAY_MS - now.0
}

fn ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap())
}

#[tokio::test]
async fn a_keys_daily_budget_refuses_past_its_limit_and_starts_again_the_next_day() {
    let (h, _outbox) = common::host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, key) = h.user(Credits::whole(10)).await;
    let id = h.broker.store().api_keys(&user.id).await.unwrap()[0]
        .id
        .clone();
    let (hold, charge) = hold_and_charge();
    assert!(hold > charge, "the test needs holds above charges");
    // Four calls fit only if each settled call counts its charge, not its
    // hold: 3 charges + 1 hold <= limit < 4 holds.
    let limit = 3 * charge + hold + 20;
    assert!(limit < 4 * hold);
    // Noon: the day has half of it left.
    let now = h.clock.now().0;
    h.clock
        .advance(ms(DAY_MS - now.rem_euclid(DAY_MS) + DAY_MS / 2));

    let r = admin_patch(
        &h,
        &id,
        json!({"budget": {"limit": limit, "period": "day"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let view: ApiKeyView = r.json().await.unwrap();
    assert_eq!(
        view.budget,
        Some(Budget {
            limit: Credits(limit),
            period: BudgetPeriod::Day
        })
    );

    let (admitted, refused) = calls_until_refused(&h, &key).await;
    assert_eq!(admitted, 4);
    let balance = h.balance(&user.id).await;
    let hits = node.hits();
    let msg = expect_error(refused, 429, "budget_exceeded").await;
    assert!(
        msg.contains(&format!("budget of {limit} micro-credits per day")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{} spent or held", 4 * charge)),
        "{msg}"
    );
    // Refused before anything: not forwarded, held or charged.
    assert_eq!(node.hits(), hits);
    assert_eq!(h.balance(&user.id).await, balance);
    assert_eq!(
        balance,
        Credits::whole(10).saturating_sub(Credits(4 * charge))
    );
    let totals = h.broker.store().ledger_totals().await.unwrap();
    assert_eq!(totals.reserved, Credits::ZERO);

    // Still the same day a second before midnight: refused.
    h.clock.advance(ms(DAY_MS / 2 - 1_000));
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    expect_error(r, 429, "budget_exceeded").await;
    // The next day starts the budget again.
    h.clock.advance(Duration::from_secs(1));
    let (admitted, refused) = calls_until_refused(&h, &key).await;
    assert_eq!(admitted, 4);
    expect_error(refused, 429, "budget_exceeded").await;

    // `null` removes the budget: calls go through at once.
    let r = admin_patch(&h, &id, json!({"budget": null})).await;
    let view: ApiKeyView = r.json().await.unwrap();
    assert_eq!(view.budget, None);
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    assert_eq!(r.status(), 200);
    h.assert_ledger().await;
}

#[tokio::test]
async fn owners_set_a_monthly_budget_that_lasts_until_the_next_month() {
    let (h, outbox) = common::host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (alice, alice_key) = h.user(Credits::whole(10)).await;
    let (bob, _) = h.user(Credits::whole(10)).await;
    let session = sign_in(&h, &outbox, &alice.email).await;
    let token = session.access_token.expose().to_owned();
    let alice_id = h.broker.store().api_keys(&alice.id).await.unwrap()[0]
        .id
        .clone();
    let bob_id = h.broker.store().api_keys(&bob.id).await.unwrap()[0]
        .id
        .clone();
    let patch = |id: &ApiKeyId, body: Value| {
        call(&h, "PATCH", format!("/v1/me/keys/{id}"))
            .bearer(&token)
            .json(body)
    };
    let (hold, charge) = hold_and_charge();
    let limit = charge + hold;

    let view: ApiKeyView = patch(
        &alice_id,
        json!({"budget": {"limit": limit, "period": "month"}}),
    )
    .ok()
    .await;
    assert_eq!(view.budget.map(|b| b.period), Some(BudgetPeriod::Month));
    let listed: Vec<ApiKeyView> = call(&h, "GET", "/v1/me/keys").bearer(&token).ok().await;
    assert_eq!(listed[0].budget, view.budget);

    // Another's key: as if it did not exist; nothing changed.
    let r = patch(&bob_id, json!({"budget": {"limit": 5, "period": "day"}}))
        .send()
        .await;
    expect_error(r, 404, "not_found").await;
    assert_eq!(
        h.broker.store().api_keys(&bob.id).await.unwrap()[0].budget,
        None
    );
    // Bad budgets: OpenAI error JSON, nothing changed.
    for bad in [
        json!({"budget": {"limit": 0, "period": "day"}}),
        json!({"budget": {"limit": -3, "period": "day"}}),
        json!({"budget": {"limit": 1_000_000_000_000_000_001i64, "period": "day"}}),
    ] {
        let r = patch(&alice_id, bad.clone()).send().await;
        let msg = expect_error(r, 400, "invalid_request").await;
        assert!(msg.contains("budget.limit"), "{bad}: {msg}");
    }
    for bad in [
        json!({"budget": {"limit": 5, "period": "week"}}),
        json!({"budget": {"limit": 5}}),
        json!({"budget": 5}),
        json!({"budget": {"limit": "5", "period": "day"}}),
    ] {
        let r = patch(&alice_id, bad.clone()).send().await;
        expect_error(r, 400, "invalid_request").await;
    }
    assert_eq!(
        h.broker.store().api_keys(&alice.id).await.unwrap()[0].budget,
        view.budget
    );
    let (admitted, refused) = calls_until_refused(&h, &alice_key).await;
    assert_eq!(admitted, 2);
    let msg = expect_error(refused, 429, "budget_exceeded").await;
    assert!(msg.contains("per month"), "{msg}");
    // (Past here the session has expired: the month is the clock's.)
    // A day later it is still the same month's budget (unless the month
    // ended: then the next is tested below all the same).
    let next_month = to_next_month(h.clock.now());
    if next_month > DAY_MS {
        h.clock.advance(ms(DAY_MS));
        let r = h.post("/v1/chat/completions", &alice_key, &chat()).await;
        expect_error(r, 429, "budget_exceeded").await;
    }
    h.clock.advance(ms(to_next_month(h.clock.now())));
    let (admitted, _) = calls_until_refused(&h, &alice_key).await;
    assert_eq!(admitted, 2);

    h.assert_ledger().await;
}

#[tokio::test]
async fn a_shared_store_counts_one_budget_for_every_host() {
    // Two hosts on one memory store said to be shared: each call's hold is
    // counted in the store, so what both admit together fits the budget.
    let store: Arc<dyn Store> = Arc::new(cxmpute_core::testkit::InstrumentedStore::new().shared());
    let a = common::host_on(store.clone(), Arc::new(common::RecordingMailer::default())).await;
    let b = common::host_on(store.clone(), Arc::new(common::RecordingMailer::default())).await;
    b.clock.set(a.clock.now());
    let (_na, _, _) = a.stand_in("a", Service::Chat, MODEL).await;
    let (_nb, _, _) = b.stand_in("b", Service::Chat, MODEL).await;
    let (user, key) = a.user(Credits::whole(10)).await;
    let id = store.api_keys(&user.id).await.unwrap()[0].id.clone();
    let (hold, charge) = hold_and_charge();
    let limit = 5 * charge + hold;
    let r = admin_patch(
        &a,
        &id,
        json!({"budget": {"limit": limit, "period": "day"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut admitted = 0;
    for i in 0..20 {
        let h = if i % 2 == 0 { &a } else { &b };
        let r = h.post("/v1/chat/completions", &key, &chat()).await;
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => {
                expect_error(r, 429, "budget_exceeded").await;
            }
            s => panic!("{s}"),
        }
    }
    assert_eq!(admitted, 6);
    let spent = store.ledger_totals().await.unwrap().charged;
    assert_eq!(spent, Credits(6 * charge));
    assert!(spent.0 <= limit);
    // Both hosts hold credit leases: idle, they go back.
    for h in [&a, &b] {
        h.clock.advance(h.broker.config().lease_idle);
        h.broker.run_maintenance().await.unwrap();
    }
    b.assert_ledger().await;
    a.assert_ledger().await;
}

#[tokio::test]
async fn a_call_refused_for_credits_gives_its_budget_hold_back_and_unbudgeted_keys_cost_no_store_call(
) {
    let store = Arc::new(cxmpute_core::testkit::InstrumentedStore::new());
    let h = common::host_on(store.clone(), Arc::new(common::RecordingMailer::default())).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (hold, charge) = hold_and_charge();
    // Credits for one call only; a budget for two.
    let (user, key) = h.user(Credits(hold)).await;
    let id = store.api_keys(&user.id).await.unwrap()[0].id.clone();
    let limit = hold + charge;
    let r = admin_patch(
        &h,
        &id,
        json!({"budget": {"limit": limit, "period": "day"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    store.take_calls();
    assert_eq!(
        h.post("/v1/chat/completions", &key, &chat()).await.status(),
        200
    );
    // Held, then given back what the charge did not use.
    assert_eq!(store.take_calls().get("add_rate_usage"), Some(&2));
    // Short of credits: refused after the budget, which takes the call back.
    for _ in 0..3 {
        let r = h.post("/v1/chat/completions", &key, &chat()).await;
        expect_error(r, 402, "insufficient_credits").await;
    }
    common::grant(&h, &user.id, 1).await;
    // The budget still has room for the one call it would have had.
    let (admitted, refused) = calls_until_refused(&h, &key).await;
    assert_eq!(admitted, 1);
    expect_error(refused, 429, "budget_exceeded").await;

    // A key without a budget: no store call for it.
    let (_, free) = h.user(Credits::whole(1)).await;
    let _ = h.post("/v1/chat/completions", &free, &chat()).await;
    store.take_calls();
    assert_eq!(
        h.post("/v1/chat/completions", &free, &chat())
            .await
            .status(),
        200
    );
    assert_eq!(store.take_calls().get("add_rate_usage"), None);
    h.assert_ledger().await;
}
