//! Budgets per account and threshold emails over real sockets: an account's
//! budget set by its owner (`PATCH /v1/me`) and by an admin
//! (`PATCH /v1/admin/users/{id}`), counted over all its keys beside each
//! key's own budget, refused with 429 `budget_exceeded` naming the account,
//! starting again the next UTC day on the test clock; alert emails through
//! a real SMTP server, once per crossing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cxmpute_core::testkit::{SmtpSink, TestHost};
use cxmpute_core::wire::*;
use cxmpute_core::*;
use serde_json::{json, Value};

use crate::common::{self, call, chat, expect_error, sign_in, MODEL};

const DAY_MS: i64 = 86_400_000;

/// What a `chat()` call holds at admission and what it is charged (as in
/// the key budget tests).
fn hold_and_charge() -> (i64, i64) {
    let body = serde_json::to_vec(&chat()).unwrap().len() as i64;
    (1_000 + body + 10, 1_000 + 10 + 10)
}

fn ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap())
}

/// Moves the clock to noon of the next UTC day.
fn to_noon(h: &TestHost) {
    let now = h.clock.now().0;
    h.clock
        .advance(ms(DAY_MS - now.rem_euclid(DAY_MS) + DAY_MS / 2));
}

async fn admin_patch(h: &TestHost, id: &UserId, body: Value) -> reqwest::Response {
    call(h, "PATCH", format!("/v1/admin/users/{id}"))
        .bearer(h.admin_key.expose())
        .json(body)
        .send()
        .await
}

/// What a store's budget counters hold now for `scope` in the day of `now`.
async fn counted(store: &Arc<dyn Store>, scope: &str, now: Timestamp) -> u64 {
    let day = Timestamp(now.0 - now.0.rem_euclid(DAY_MS));
    let t = store
        .add_rate_usage(scope, day, RateUsage::default())
        .await
        .unwrap()
        .unwrap();
    t.requests - t.tokens
}

#[tokio::test]
async fn an_accounts_budget_counts_all_its_keys_and_refuses_while_the_keys_budget_does_not() {
    let (h, outbox) = common::host().await;
    let (node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, key1) = h.user(Credits::whole(10)).await;
    let key1_id = h.broker.store().api_keys(&user.id).await.unwrap()[0]
        .id
        .clone();
    let (_, key2) = (h.broker.admin())
        .create_api_key(&user.id, "second", None, Vec::new())
        .await
        .unwrap();
    let (hold, charge) = hold_and_charge();
    // Five calls fit: 4 charges + 1 hold <= limit < 5 charges + 1 hold.
    let limit = 4 * charge + hold + 20;
    to_noon(&h);
    let session = sign_in(&h, &outbox, &user.email).await;
    let token = session.access_token.expose().to_owned();

    // The first key has a budget of its own, far from used up.
    let r = call(&h, "PATCH", format!("/v1/me/keys/{key1_id}"))
        .bearer(&token)
        .json(json!({"budget": {"limit": 100 * hold, "period": "day"}}))
        .send()
        .await;
    assert_eq!(r.status(), 200);
    let me: MeResponse = call(&h, "PATCH", "/v1/me")
        .bearer(&token)
        .json(json!({"budget": {"limit": limit, "period": "day"}}))
        .ok()
        .await;
    let budget = Some(Budget {
        limit: Credits(limit),
        period: BudgetPeriod::Day,
    });
    assert_eq!((me.budget, me.budget_spent), (budget, Some(Credits::ZERO)));

    // Both keys spend from the account's one budget.
    let mut admitted = 0;
    let refused = loop {
        let key = if admitted % 2 == 0 { &key1 } else { &key2 };
        let r = h.post("/v1/chat/completions", key, &chat()).await;
        if r.status() != 200 {
            break r;
        }
        r.bytes().await.unwrap();
        admitted += 1;
        assert!(admitted < 50, "the account budget never refused");
    };
    assert_eq!(admitted, 5);
    let balance = h.balance(&user.id).await;
    let hits = node.hits();
    let msg = expect_error(refused, 429, "budget_exceeded").await;
    assert!(
        msg.contains(&format!(
            "account's budget of {limit} micro-credits per day"
        )),
        "{msg}"
    );
    // Refused before anything: not forwarded, held or charged.
    assert_eq!(node.hits(), hits);
    assert_eq!(h.balance(&user.id).await, balance);
    assert_eq!(
        h.broker.store().ledger_totals().await.unwrap().reserved,
        Credits::ZERO
    );
    // The refusal (its call was key1's, then key2's turn: make sure of key1)
    // gave back what key1's own budget had counted: it counts its charges.
    let r = h.post("/v1/chat/completions", &key1, &chat()).await;
    expect_error(r, 429, "budget_exceeded").await;
    let store = h.broker.store().clone();
    let key_scope = format!("budget:key:{key1_id}:day");
    assert_eq!(
        counted(&store, &key_scope, h.clock.now()).await,
        3 * charge as u64
    );
    let me: MeResponse = call(&h, "GET", "/v1/me").bearer(&token).ok().await;
    assert_eq!(me.budget_spent, Some(Credits(5 * charge)));

    // The next day starts the account's budget again.
    h.clock.advance(ms(DAY_MS));
    for key in [&key1, &key2] {
        let r = h.post("/v1/chat/completions", key, &chat()).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    // An admin removes it (and sees it in the user's view first).
    let detail: AdminUserDetail = call(&h, "GET", format!("/v1/admin/users/{}", user.id))
        .bearer(h.admin_key.expose())
        .ok()
        .await;
    assert_eq!(detail.user.budget, budget);
    let r = admin_patch(&h, &user.id, json!({"budget": null})).await;
    let view: AdminUserView = r.json().await.unwrap();
    assert_eq!(view.budget, None);
    for _ in 0..6 {
        let r = h.post("/v1/chat/completions", &key2, &chat()).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    h.assert_ledger().await;
}

#[tokio::test]
async fn account_settings_are_checked_and_refused_with_openai_errors() {
    let (h, outbox) = common::host().await;
    let (user, _) = h.user(Credits::whole(1)).await;
    let session = sign_in(&h, &outbox, &user.email).await;
    let token = session.access_token.expose().to_owned();
    let patch = |body: Value| call(&h, "PATCH", "/v1/me").bearer(&token).json(body);
    for (bad, says) in [
        (
            json!({"budget": {"limit": 0, "period": "day"}}),
            "budget.limit",
        ),
        (json!({"alerts": {"budget_percent": 0}}), "budget_percent"),
        (json!({"alerts": {"budget_percent": 101}}), "budget_percent"),
        (json!({"alerts": {"balance_below": -1}}), "balance_below"),
    ] {
        let r = patch(bad.clone()).send().await;
        let msg = expect_error(r, 400, "invalid_request").await;
        assert!(msg.contains(says), "{bad}: {msg}");
    }
    for bad in [
        json!({"budget": {"limit": 5, "period": "week"}}),
        json!({"alerts": {"budget_percent": 300}}),
        json!({"alerts": 5}),
        json!({"alerts": {"balance_bellow": 5}}),
        json!({"budgets": null}),
    ] {
        let r = patch(bad.clone()).send().await;
        expect_error(r, 400, "invalid_request").await;
    }
    let u = h.broker.store().user(&user.id).await.unwrap();
    assert_eq!((u.budget, u.alerts), (None, Alerts::default()));
    // Set, then an absent field stays.
    let me: MeResponse = patch(json!({"alerts": {"balance_below": 5, "budget_percent": 80}}))
        .ok()
        .await;
    assert_eq!(me.alerts.budget_percent, Some(80));
    let me: MeResponse = patch(json!({"budget": {"limit": 9, "period": "month"}}))
        .ok()
        .await;
    assert_eq!(
        (me.alerts.balance_below, me.budget.map(|b| b.limit)),
        (Some(Credits(5)), Some(Credits(9)))
    );
    // `null` removes every alert; the budget stays.
    let me: MeResponse = patch(json!({"alerts": null})).ok().await;
    assert_eq!((me.alerts, me.budget.is_some()), (Alerts::default(), true));
    // Only admins change another's account; an unknown one is 404.
    let r = admin_patch(&h, &UserId::new("usr_nobody"), json!({"budget": null})).await;
    expect_error(r, 404, "not_found").await;
    let r = call(&h, "PATCH", format!("/v1/admin/users/{}", user.id))
        .bearer(&token)
        .json(json!({"budget": null}))
        .send()
        .await;
    assert_eq!(r.status(), 403);
}

/// An admin's grant of `micros` to `user`.
async fn grant_micros(h: &TestHost, user: &UserId, micros: i64) {
    let r = call(h, "POST", format!("/v1/admin/users/{user}/credits"))
        .bearer(h.admin_key.expose())
        .json(json!({"amount": micros, "reason": "top-up"}))
        .send()
        .await;
    assert_eq!(r.status(), 200);
}

/// Calls with `key` until one is refused or `n` went through: how many did.
async fn calls(h: &TestHost, key: &Secret, n: usize) -> usize {
    for done in 0..n {
        let r = h.post("/v1/chat/completions", key, &chat()).await;
        if r.status() != 200 {
            return done;
        }
        r.bytes().await.unwrap();
    }
    n
}

#[tokio::test]
async fn the_balance_alert_is_mailed_once_per_crossing_through_a_real_smtp_server() {
    let Some(sink) = SmtpSink::from_env() else {
        return;
    };
    let h = common::host_with(sink.mailer()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, charge) = hold_and_charge();
    let start = Credits::whole(1);
    let (user, key) = h.user(start).await;
    // Below after the fourth call.
    let threshold = start.0 - 4 * charge + charge / 2;
    let r = admin_patch(
        &h,
        &user.id,
        json!({"alerts": {"balance_below": threshold}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut seen = HashSet::new();

    assert_eq!(calls(&h, &key, 3).await, 3);
    h.alerts_done().await;
    assert!(sink.new_mail(&user.email, &mut seen).is_empty());
    // Many calls below the threshold: one mail.
    assert_eq!(calls(&h, &key, 12).await, 12);
    h.alerts_done().await;
    let mails = sink.new_mail(&user.email, &mut seen);
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(
        mails[0].contains("Subject: Your Cxmpute balance is low"),
        "{}",
        mails[0]
    );
    let below = format!("below the 0.{threshold:06} credits",);
    assert!(mails[0].contains(&below), "{}", mails[0]);
    // A grant that leaves it below: still no new crossing.
    grant_micros(&h, &user.id, charge).await;
    assert_eq!(calls(&h, &key, 2).await, 2);
    h.alerts_done().await;
    assert!(sink.new_mail(&user.email, &mut seen).is_empty());
    // Back above, then below again: a second mail, once.
    let balance = h.balance(&user.id).await;
    grant_micros(&h, &user.id, threshold - balance.0 + 2 * charge).await;
    assert_eq!(calls(&h, &key, 10).await, 10);
    h.alerts_done().await;
    let mails = sink.new_mail(&user.email, &mut seen);
    assert_eq!(mails.len(), 1, "{mails:?}");
    h.assert_ledger().await;
}

#[tokio::test]
async fn the_budget_alert_is_mailed_once_per_period_through_a_real_smtp_server() {
    let Some(sink) = SmtpSink::from_env() else {
        return;
    };
    let h = common::host_with(sink.mailer()).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (hold, charge) = hold_and_charge();
    let (user, key) = h.user(Credits::whole(10)).await;
    to_noon(&h);
    // 40% of the budget is reached by the third call's charge (with no
    // call under way), not by the second's.
    let limit = 5 * charge + hold;
    assert!(2 * charge * 100 < 40 * limit && 3 * charge * 100 >= 40 * limit);
    let body = json!({
        "budget": {"limit": limit, "period": "day"},
        "alerts": {"budget_percent": 40},
    });
    let r = admin_patch(&h, &user.id, body).await;
    assert_eq!(r.status(), 200);
    let mut seen = HashSet::new();

    assert_eq!(calls(&h, &key, 2).await, 2);
    h.alerts_done().await;
    assert!(sink.new_mail(&user.email, &mut seen).is_empty());
    // On to the budget's end: one mail.
    assert_eq!(calls(&h, &key, 20).await, 4);
    h.alerts_done().await;
    let mails = sink.new_mail(&user.email, &mut seen);
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].contains("Subject: Your Cxmpute budget is nearly used"));
    let spent = format!("spent 0.{:06} credits this day,", 3 * charge);
    assert!(mails[0].contains(&spent), "{}", mails[0]);
    // The next day: once more.
    h.clock.advance(ms(DAY_MS));
    assert_eq!(calls(&h, &key, 20).await, 6);
    h.alerts_done().await;
    assert_eq!(sink.new_mail(&user.email, &mut seen).len(), 1);
    h.assert_ledger().await;
}

#[tokio::test]
async fn an_accounts_monthly_budget_lasts_until_the_next_month() {
    let (h, _outbox) = common::host().await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, key) = h.user(Credits::whole(10)).await;
    let (hold, charge) = hold_and_charge();
    let limit = charge + hold;
    let r = admin_patch(
        &h,
        &user.id,
        json!({"budget": {"limit": limit, "period": "month"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(calls(&h, &key, 10).await, 2);
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    let msg = expect_error(r, 429, "budget_exceeded").await;
    assert!(
        msg.contains("account's budget") && msg.contains("per month"),
        "{msg}"
    );
    // The first of the next month, 00:00 UTC, starts it again.
    let now = h.clock.now();
    let (y, m, _) = now.day().ymd();
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next = i64::from(Day::from_ymd(y, m, 1).unwrap().0) * DAY_MS;
    h.clock.advance(ms(next - now.0 - 1));
    let r = h.post("/v1/chat/completions", &key, &chat()).await;
    expect_error(r, 429, "budget_exceeded").await;
    h.clock.advance(ms(1));
    assert_eq!(calls(&h, &key, 10).await, 2);
    h.assert_ledger().await;
}

/// Fails the first alert it is asked to send, then records them.
#[derive(Clone, Default)]
struct FlakyMailer(Arc<parking_lot::Mutex<(bool, Vec<AlertMail>)>>);

#[async_trait::async_trait]
impl Mailer for FlakyMailer {
    async fn send_login_code(&self, _email: &str, _code: &Secret) -> Result<()> {
        Ok(())
    }

    async fn send_alert(&self, _email: &str, alert: &AlertMail) -> Result<()> {
        let mut s = self.0.lock();
        if !s.0 {
            s.0 = true;
            return Err(Error::Unavailable {
                message: "the relay is down".into(),
                source: None,
            });
        }
        s.1.push(alert.clone());
        Ok(())
    }
}

#[tokio::test]
async fn a_mailer_failure_gives_the_mark_back_and_a_later_call_sends_the_alert() {
    let mailer = FlakyMailer::default();
    let h = common::host_with(Arc::new(mailer.clone())).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (_, charge) = hold_and_charge();
    let (user, key) = h.user(Credits::whole(1)).await;
    let threshold = 1_000_000 - charge / 2;
    let r = admin_patch(
        &h,
        &user.id,
        json!({"alerts": {"balance_below": threshold}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    // Below at once: the send fails, the mark is given back.
    assert_eq!(calls(&h, &key, 1).await, 1);
    h.alerts_done().await;
    let u = h.broker.store().user(&user.id).await.unwrap();
    assert_eq!(u.alerted.balance, None, "the mark was given back");
    assert!(mailer.0.lock().1.is_empty());
    // The next call sends it, once.
    assert_eq!(calls(&h, &key, 3).await, 3);
    h.alerts_done().await;
    let sent = mailer.0.lock().1.clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(matches!(
        sent[0],
        AlertMail::BalanceBelow { threshold: t, .. } if t == Credits(threshold)
    ));
    assert!(h
        .broker
        .store()
        .user(&user.id)
        .await
        .unwrap()
        .alerted
        .balance
        .is_some());
    h.assert_ledger().await;
}

#[tokio::test]
async fn what_an_account_budget_and_alerts_cost_in_store_calls() {
    let store = Arc::new(cxmpute_core::testkit::InstrumentedStore::new());
    let h = common::host_on(store.clone(), Arc::new(common::RecordingMailer::default())).await;
    let (_node, _, _) = h.stand_in("a", Service::Chat, MODEL).await;
    let (user, key) = h.user(Credits::whole(1)).await;
    let per_call = |n: usize| {
        let calls = store.take_calls();
        let of = |name: &str| calls.get(name).copied().unwrap_or(0) as f64 / n as f64;
        (of("add_rate_usage"), of("user"), of("swap_alert_mark"))
    };
    let _ = calls(&h, &key, 1).await;
    store.take_calls();
    assert_eq!(calls(&h, &key, 10).await, 10);
    assert_eq!(per_call(10), (0.0, 0.0, 0.0), "nothing set: no store call");

    // A budget: a hold and a give-back per call.
    let r = admin_patch(
        &h,
        &user.id,
        json!({"budget": {"limit": 1_000_000, "period": "day"}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = calls(&h, &key, 1).await;
    store.take_calls();
    assert_eq!(calls(&h, &key, 10).await, 10);
    assert_eq!(per_call(10), (2.0, 0.0, 0.0));

    // A balance alert above the threshold: one read of the account per
    // charged call, off the call's path.
    let r = admin_patch(
        &h,
        &user.id,
        json!({"budget": null, "alerts": {"balance_below": 1}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = calls(&h, &key, 1).await;
    h.alerts_done().await;
    store.take_calls();
    assert_eq!(calls(&h, &key, 10).await, 10);
    h.alerts_done().await;
    assert_eq!(per_call(10), (0.0, 1.0, 0.0));

    // Below it and mailed: the host remembers, no store call at all.
    let below = h.balance(&user.id).await.0 + 1;
    let r = admin_patch(&h, &user.id, json!({"alerts": {"balance_below": below}})).await;
    assert_eq!(r.status(), 200);
    let _ = calls(&h, &key, 1).await;
    h.alerts_done().await;
    assert_eq!(store.take_calls().get("swap_alert_mark"), Some(&1));
    assert_eq!(calls(&h, &key, 10).await, 10);
    h.alerts_done().await;
    assert_eq!(per_call(10), (0.0, 0.0, 0.0));
    h.assert_ledger().await;
}
