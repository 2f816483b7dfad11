//! The account API against a real host router on loopback: sign-in by mailed
//! code, self-renewing sessions, own keys, usage and notifications.

mod common;

use std::time::Duration;

use common::{World, MODEL};
use cxmpute_client::types::{Alerts, Budget, BudgetPeriod, Credits, Placement, Route, Timestamp};
use cxmpute_client::wire::{
    ChatCompletionRequest, ChatMessage, CreateKeyRequest, GrantCreditsRequest, NotificationRequest,
    UpdateAccountRequest, UpdateKeyRequest,
};
use cxmpute_client::{Client, Error};

fn hi() -> ChatCompletionRequest {
    ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")])
}

#[tokio::test]
async fn request_a_code_and_sign_in_with_it() {
    let w = World::start().await;
    let anon = w.anonymous();
    let sent = anon
        .account()
        .request_code("Ada@Example.com")
        .await
        .unwrap();
    assert_eq!(sent.status, "sent");
    assert!(sent.expires_in > 0);
    let code = w.inbox.last_code("ada@example.com");

    let e = anon
        .account()
        .verify("ada@example.com", "000000x")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");

    let tokens = anon
        .account()
        .verify("ada@example.com", &code)
        .await
        .unwrap();
    assert_eq!(tokens.token_type, "Bearer");
    assert!(tokens.expires_in > 0 && tokens.refresh_expires_in > tokens.expires_in);
    let session = anon.with_session(tokens.clone());
    let me = session.account().me().await.unwrap();
    assert_eq!(me.user_id, tokens.user_id);
    assert_eq!(me.email, "ada@example.com");
    assert!(!me.is_admin && me.suspended.is_none());
    assert_eq!(session.session().await, Some(tokens));
    // A code works once.
    let again = anon
        .account()
        .sign_in("ada@example.com", &code)
        .await
        .unwrap_err();
    assert_eq!(again.status(), Some(401));
}

#[tokio::test]
async fn an_api_key_is_not_a_session() {
    let w = World::start().await;
    let e = w.client().account().me().await.unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(401), Some("invalid_api_key")),
        "{e}"
    );
    assert_eq!(w.client().session().await, None);
}

#[tokio::test]
async fn a_session_renews_itself_once_for_all_its_clones() {
    let w = World::start().await;
    let session = w.sign_in("bob@example.com").await;
    let first = session.session().await.unwrap();
    // The access token expires on the host's clock; the refresh token lives on.
    w.host
        .clock
        .advance(Duration::from_secs(first.expires_in + 60));
    let clones: Vec<Client> = (0..8).map(|_| session.clone()).collect();
    let answers =
        futures::future::join_all(clones.iter().map(|c| async move { c.account().me().await }))
            .await;
    for a in answers {
        assert_eq!(a.unwrap().email, "bob@example.com");
    }
    let renewed = session.session().await.unwrap();
    assert_ne!(renewed.access_token, first.access_token);
    assert_ne!(renewed.refresh_token, first.refresh_token);
    // One renewal served every clone: a second use of a refresh token would
    // have ended the session, and it still works.
    session.account().keys().await.unwrap();
}

#[tokio::test]
async fn refresh_trades_a_token_once_and_a_reuse_ends_the_session() {
    let w = World::start().await;
    let session = w.sign_in("eve@example.com").await;
    let tokens = session.session().await.unwrap();
    let anon = w.anonymous();
    let fresh = anon.account().refresh(&tokens.refresh_token).await.unwrap();
    assert_eq!(fresh.user_id, tokens.user_id);
    assert_ne!(fresh.refresh_token, tokens.refresh_token);
    let reuse = anon
        .account()
        .refresh(&tokens.refresh_token)
        .await
        .unwrap_err();
    assert_eq!(reuse.status(), Some(401));
    // The reuse revoked the family: the fresh tokens are dead too.
    let e = anon.with_session(fresh).account().me().await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
}

#[tokio::test]
async fn logout_ends_the_session() {
    let w = World::start().await;
    let session = w.sign_in("carl@example.com").await;
    session.account().me().await.unwrap();
    session.account().logout().await.unwrap();
    session.account().logout().await.unwrap();
    let e = session.account().me().await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let tokens = session.session().await.unwrap();
    let e = w
        .anonymous()
        .account()
        .refresh(&tokens.refresh_token)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401));
}

#[tokio::test]
async fn own_keys_are_created_used_changed_and_revoked() {
    let w = World::start().await;
    let session = w.sign_in("dana@example.com").await;
    let me = session.account().me().await.unwrap();
    w.admin()
        .admin()
        .grant_credits(
            &me.user_id,
            &GrantCreditsRequest {
                amount: Credits::whole(3),
                reason: "trial".into(),
            },
        )
        .await
        .unwrap();

    let created = session
        .account()
        .create_key(&CreateKeyRequest {
            name: Some("ci".into()),
            credit_limit: Some(Credits::whole(1)),
            permitted_routes: vec![Route::ChatCompletions],
        })
        .await
        .unwrap();
    assert_eq!(created.key.name, "ci");
    assert_eq!(created.key.credit_limit, Some(Credits::whole(1)));
    assert_eq!(created.key.permitted_routes, vec![Route::ChatCompletions]);
    assert!(created.api_key.expose().starts_with(&created.key.prefix));
    let ci = session.with_bearer(created.api_key.expose());
    ci.user().chat(&hi()).await.unwrap();

    let keys = session.account().keys().await.unwrap();
    let listed = keys
        .iter()
        .find(|k| k.key_id == created.key.key_id)
        .unwrap();
    assert!(listed.last_used_at.is_some());
    assert_eq!(listed.credits_left, Some(Credits(1_000_000 - 1_020)));

    let change = UpdateKeyRequest {
        name: Some("ci-2".into()),
        credit_limit: Some(None),
        permitted_routes: Some(Vec::new()),
        rpm: Some(Some(60)),
        tpm: Some(Some(100_000)),
        budget: Some(Some(Budget {
            limit: Credits(5_000_000),
            period: BudgetPeriod::Month,
        })),
        cache_ttl_secs: Some(Some(300)),
        cache_shared: None,
    };
    let changed = session
        .account()
        .update_key(&created.key.key_id, &change)
        .await
        .unwrap();
    assert_eq!(changed.name, "ci-2");
    assert_eq!((changed.credit_limit, changed.credits_left), (None, None));
    assert!(changed.permitted_routes.is_empty());
    assert_eq!((changed.rpm, changed.tpm), (Some(60), Some(100_000)));
    assert_eq!(changed.cache.ttl_secs, Some(300));
    assert!(!changed.cache.shared);
    // Sharing cached answers across accounts is an admin's decision.
    let share = UpdateKeyRequest {
        cache_shared: Some(true),
        ..Default::default()
    };
    let refused = session
        .account()
        .update_key(&created.key.key_id, &share)
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused:?}");
    assert_eq!(
        changed.budget,
        Some(Budget {
            limit: Credits(5_000_000),
            period: BudgetPeriod::Month,
        })
    );
    // An absent field stays as it is.
    let rename = UpdateKeyRequest {
        name: Some("ci-3".into()),
        ..Default::default()
    };
    let renamed = session
        .account()
        .update_key(&created.key.key_id, &rename)
        .await
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.credit_limit),
        ("ci-3", None)
    );
    assert!(renamed.budget.is_some(), "an absent budget stays");
    let unbudget = UpdateKeyRequest {
        budget: Some(None),
        ..Default::default()
    };
    let unbudgeted = session
        .account()
        .update_key(&created.key.key_id, &unbudget)
        .await
        .unwrap();
    assert_eq!(unbudgeted.budget, None, "null removes the budget");

    session
        .account()
        .revoke_key(&created.key.key_id)
        .await
        .unwrap();
    let e = ci.user().chat(&hi()).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let e = session
        .account()
        .revoke_key(&created.key.key_id)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(session
        .account()
        .keys()
        .await
        .unwrap()
        .iter()
        .all(|k| k.key_id != created.key.key_id));
}

#[tokio::test]
async fn usage_counts_the_days_and_the_calls() {
    let w = World::start().await;
    let session = w.sign_in("fay@example.com").await;
    let me = session.account().me().await.unwrap();
    let grant = GrantCreditsRequest {
        amount: Credits::whole(1),
        reason: "t".into(),
    };
    w.admin()
        .admin()
        .grant_credits(&me.user_id, &grant)
        .await
        .unwrap();
    let key = session
        .account()
        .create_key(&CreateKeyRequest::default())
        .await
        .unwrap();
    let user = session.with_bearer(key.api_key.expose());
    user.user().chat(&hi()).await.unwrap();
    user.user().chat(&hi()).await.unwrap();
    w.host.broker.flush_stats().await.unwrap();

    let week = session.account().usage(Some(7)).await.unwrap();
    assert_eq!(week.days.len(), 7);
    assert_eq!(week.days.last().unwrap().day, week.to);
    assert_eq!(week.days.iter().map(|d| d.requests).sum::<u64>(), 2);
    assert_eq!(
        week.days.iter().map(|d| d.charged.as_micros()).sum::<i64>(),
        2_040
    );
    assert_eq!(week.recent.len(), 2, "the latest requests, newest first");
    assert!(week.recent[0].at >= week.recent[1].at);
    assert_eq!(week.recent[0].model, MODEL);
    assert_eq!(week.recent[0].charged, Credits(1_020));
    let default = session.account().usage(None).await.unwrap();
    assert_eq!(default.days.len(), 30);
    let e = session.account().usage(Some(0)).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
}

#[tokio::test]
async fn notifications_shown_now_are_public() {
    let w = World::start().await;
    let now = w.host.broker.now();
    let n = w
        .admin()
        .admin()
        .create_notification(&NotificationRequest {
            title: "Maintenance".into(),
            banner: "Sunday".into(),
            popup: String::new(),
            starts_at: Timestamp(now.millis() - 1_000),
            ends_at: Timestamp(now.millis() + 3_600_000),
            placements: vec![Placement::UserDashboard],
        })
        .await
        .unwrap();
    let anon = w.anonymous();
    let shown = anon
        .account()
        .notifications(Some(Placement::UserDashboard))
        .await
        .unwrap();
    assert_eq!(shown.iter().map(|x| &x.id).collect::<Vec<_>>(), vec![&n.id]);
    assert!(anon
        .account()
        .notifications(Some(Placement::Homepage))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(anon.account().notifications(None).await.unwrap().len(), 1);
    w.host.clock.advance(Duration::from_secs(7_200));
    assert!(anon.account().notifications(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_refused_renewal_returns_the_refusal() {
    let w = World::start().await;
    let session = w.sign_in("gus@example.com").await;
    let tokens = session.session().await.unwrap();
    // Another holder of the same tokens renews first: this client's refresh
    // token is then a used one.
    w.anonymous()
        .account()
        .refresh(&tokens.refresh_token)
        .await
        .unwrap();
    w.host
        .clock
        .advance(Duration::from_secs(tokens.expires_in + 60));
    let e = session.account().me().await.unwrap_err();
    assert!(matches!(&e, Error::Api(a) if a.status == 401), "{e:?}");
}

#[tokio::test]
async fn the_account_budget_and_alerts_are_set_by_the_owner_and_an_admin() {
    let w = World::start().await;
    let session = w.sign_in("erin@example.com").await;
    let budget = Budget {
        limit: Credits::whole(2),
        period: BudgetPeriod::Month,
    };
    let alerts = Alerts {
        balance_below: Some(Credits::whole(1)),
        budget_percent: Some(75),
    };
    let change = UpdateAccountRequest {
        budget: Some(Some(budget)),
        alerts: Some(alerts),
    };
    let me = session.account().update_account(&change).await.unwrap();
    assert_eq!((me.budget, me.alerts), (Some(budget), alerts));
    assert_eq!(me.budget_spent, Some(Credits::ZERO));
    // Bad settings: the host's error, nothing changed.
    let bad = UpdateAccountRequest {
        alerts: Some(Alerts {
            budget_percent: Some(0),
            ..alerts
        }),
        ..Default::default()
    };
    let err = session.account().update_account(&bad).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    // An admin removes the budget; the alerts stay.
    let removed = w
        .admin()
        .admin()
        .update_user(
            &me.user_id,
            &UpdateAccountRequest {
                budget: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((removed.budget, removed.alerts), (None, alerts));
    let me = session.account().me().await.unwrap();
    assert_eq!((me.budget, me.budget_spent), (None, None));
}
