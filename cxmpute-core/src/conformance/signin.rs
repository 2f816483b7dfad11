//! Conformance cases of [`SignInStore`](crate::store::SignInStore): sign-in
//! codes and refresh tokens.

use std::sync::Arc;

use crate::error::Error;
use crate::secret::KeyHash;
use crate::store::Store;
use crate::types::*;

use super::fixtures::*;

// ---- sign-in codes ----------------------------------------------------------

fn login_code(email: &str, code: &str, created: Timestamp) -> LoginCode {
    LoginCode {
        email: email.to_owned(),
        code_hash: KeyHash::of(code),
        expires_at: Timestamp(created.0 + 600_000),
        created_at: created,
    }
}

/// A right code signs in once; the second use is `Unauthorized`.
pub async fn login_code_is_single_use(store: Arc<dyn Store>) {
    let c = login_code("a@example.com", "123456", at(0));
    store.issue_login_code(&c, at(-3_600_000), 5).await.unwrap();
    assert_err!(
        store
            .verify_login_code("b@example.com", &KeyHash::of("123456"), at(1), 5)
            .await,
        Error::Unauthorized(_)
    );
    store
        .verify_login_code("a@example.com", &KeyHash::of("123456"), at(1), 5)
        .await
        .unwrap();
    assert_err!(
        store
            .verify_login_code("a@example.com", &KeyHash::of("123456"), at(2), 5)
            .await,
        Error::Unauthorized(_)
    );
}

/// A code stops working at its expiry instant.
pub async fn login_code_expires(store: Arc<dyn Store>) {
    let c = login_code("a@example.com", "111111", at(0));
    store.issue_login_code(&c, at(-3_600_000), 5).await.unwrap();
    assert_err!(
        store
            .verify_login_code("a@example.com", &c.code_hash, c.expires_at, 5)
            .await,
        Error::Unauthorized(_)
    );
    let d = login_code("b@example.com", "222222", at(0));
    store.issue_login_code(&d, at(-3_600_000), 5).await.unwrap();
    store
        .verify_login_code(
            "b@example.com",
            &d.code_hash,
            Timestamp(d.expires_at.0 - 1),
            5,
        )
        .await
        .unwrap();
}

/// After `max` wrong tries even the right code fails; fewer wrong tries do not
/// stop it.
pub async fn login_code_attempts_are_limited(store: Arc<dyn Store>) {
    let wrong = KeyHash::of("000000");
    let c = login_code("a@example.com", "424242", at(0));
    store.issue_login_code(&c, at(-3_600_000), 5).await.unwrap();
    for i in 0..3 {
        assert_err!(
            store
                .verify_login_code("a@example.com", &wrong, at(1 + i), 3)
                .await,
            Error::Unauthorized(_)
        );
    }
    assert_err!(
        store
            .verify_login_code("a@example.com", &c.code_hash, at(10), 3)
            .await,
        Error::Unauthorized(_)
    );

    let d = login_code("b@example.com", "434343", at(0));
    store.issue_login_code(&d, at(-3_600_000), 5).await.unwrap();
    for i in 0..2 {
        assert_err!(
            store
                .verify_login_code("b@example.com", &wrong, at(1 + i), 3)
                .await,
            Error::Unauthorized(_)
        );
    }
    store
        .verify_login_code("b@example.com", &d.code_hash, at(10), 3)
        .await
        .unwrap();
}

/// A new code replaces the old one and starts with no wrong tries.
pub async fn login_code_reissue_replaces_and_resets_attempts(store: Arc<dyn Store>) {
    let wrong = KeyHash::of("000000");
    let first = login_code("a@example.com", "111111", at(0));
    store
        .issue_login_code(&first, at(-3_600_000), 5)
        .await
        .unwrap();
    for i in 0..3 {
        let _ = store
            .verify_login_code("a@example.com", &wrong, at(1 + i), 3)
            .await;
    }
    let second = login_code("a@example.com", "222222", at(100));
    store
        .issue_login_code(&second, at(-3_600_000), 5)
        .await
        .unwrap();
    assert_err!(
        store
            .verify_login_code("a@example.com", &first.code_hash, at(101), 3)
            .await,
        Error::Unauthorized(_)
    );
    store
        .verify_login_code("a@example.com", &second.code_hash, at(102), 3)
        .await
        .unwrap();
}

/// At most `max_per_window` codes per email in the window; older issues and
/// other emails do not count.
pub async fn login_codes_are_rate_limited_per_window(store: Arc<dyn Store>) {
    let hour = 3_600_000;
    for i in 0..3 {
        let c = login_code("a@example.com", &format!("00000{i}"), at(i * 1_000));
        store.issue_login_code(&c, at(-hour), 3).await.unwrap();
    }
    let fourth = login_code("a@example.com", "999999", at(5_000));
    assert_err!(
        store.issue_login_code(&fourth, at(5_000 - hour), 3).await,
        Error::RateLimited(_)
    );
    // The refused code was not stored: the last issued one still works.
    assert_err!(
        store
            .verify_login_code("a@example.com", &fourth.code_hash, at(5_001), 5)
            .await,
        Error::Unauthorized(_)
    );
    // Another email has its own window.
    let other = login_code("b@example.com", "555555", at(5_000));
    store
        .issue_login_code(&other, at(5_000 - hour), 3)
        .await
        .unwrap();
    // Once the first issue falls out of the window, one more is allowed.
    let later = login_code("a@example.com", "777777", at(hour + 500));
    store.issue_login_code(&later, at(500), 3).await.unwrap();
    let again = login_code("a@example.com", "888888", at(hour + 600));
    assert_err!(
        store.issue_login_code(&again, at(600), 3).await,
        Error::RateLimited(_)
    );
    store
        .verify_login_code("a@example.com", &later.code_hash, at(hour + 700), 5)
        .await
        .unwrap();
}

/// Housekeeping deletes the codes issued before the cut, used or not, and
/// the issue records of emails last issued one before it; newer codes stay.
pub async fn old_login_codes_are_pruned(store: Arc<dyn Store>) {
    let hour = 3_600_000;
    let issue = |c: LoginCode| {
        let store = store.clone();
        async move {
            let window = Timestamp(c.created_at.0 - hour);
            store.issue_login_code(&c, window, 5).await.unwrap();
        }
    };
    let a = login_code("a@example.com", "111111", at(0));
    issue(a.clone()).await;
    issue(login_code("b@example.com", "222222", at(1_000))).await;
    let used = login_code("u@example.com", "333333", at(2_000));
    issue(used.clone()).await;
    store
        .verify_login_code("u@example.com", &used.code_hash, at(2_001), 5)
        .await
        .unwrap();
    let c = login_code("c@example.com", "444444", at(hour));
    issue(c.clone()).await;
    // An old code replaced by a newer one.
    issue(login_code("e@example.com", "555555", at(0))).await;
    let e = login_code("e@example.com", "666666", at(hour + 1));
    issue(e.clone()).await;

    // a's and b's codes go (the used one was gone already); again, nothing.
    assert_eq!(store.prune_login_codes(at(hour)).await.unwrap(), 2);
    assert_eq!(store.prune_login_codes(at(hour)).await.unwrap(), 0);
    // A pruned code is gone, even at a time it would still be valid.
    assert_err!(
        store
            .verify_login_code("a@example.com", &a.code_hash, at(10), 5)
            .await,
        Error::Unauthorized(_)
    );
    // So is a's record of issues: a limit of one in a window reaching back
    // to its old code allows a new one.
    let again = login_code("a@example.com", "777777", at(hour + 20));
    store.issue_login_code(&again, at(-hour), 1).await.unwrap();
    // Newer codes still work.
    for (email, code) in [("c@example.com", &c), ("e@example.com", &e)] {
        store
            .verify_login_code(email, &code.code_hash, at(hour + 30), 5)
            .await
            .unwrap();
    }
}

// ---- refresh tokens ---------------------------------------------------------

fn refresh(
    user: &UserId,
    family: &TokenFamilyId,
    secret: &str,
    created: Timestamp,
) -> RefreshToken {
    RefreshToken {
        hash: KeyHash::of(secret),
        family: family.clone(),
        user_id: user.clone(),
        expires_at: Timestamp(created.0 + 86_400_000),
        created_at: created,
    }
}

/// Rotation returns the user, keeps the family, and the new token rotates on.
pub async fn refresh_token_rotates(store: Arc<dyn Store>) {
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    assert_err!(
        store.create_refresh_token(&t1).await,
        Error::AlreadyExists(_)
    );
    assert_eq!(store.refresh_token_family(&t1.hash).await.unwrap(), fam);

    let t2 = refresh(&user, &fam, "t2", at(10));
    assert_eq!(
        store
            .rotate_refresh_token(&t1.hash, &t2, at(10))
            .await
            .unwrap(),
        user
    );
    assert_eq!(store.refresh_token_family(&t2.hash).await.unwrap(), fam);
    let t3 = refresh(&user, &fam, "t3", at(20));
    assert_eq!(
        store
            .rotate_refresh_token(&t2.hash, &t3, at(20))
            .await
            .unwrap(),
        user
    );
    assert_err!(
        store
            .rotate_refresh_token(
                &KeyHash::of("never issued"),
                &refresh(&user, &fam, "x", at(21)),
                at(21)
            )
            .await,
        Error::Unauthorized(_)
    );
}

/// Presenting a used token revokes the whole family: the newest token stops
/// working too.
pub async fn refresh_token_reuse_revokes_family(store: Arc<dyn Store>) {
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let other_fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    let o1 = refresh(&user, &other_fam, "o1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    store.create_refresh_token(&o1).await.unwrap();
    let t2 = refresh(&user, &fam, "t2", at(10));
    store
        .rotate_refresh_token(&t1.hash, &t2, at(10))
        .await
        .unwrap();

    // An attacker replays t1.
    let stolen = refresh(&user, &fam, "t2-attacker", at(20));
    assert_err!(
        store.rotate_refresh_token(&t1.hash, &stolen, at(20)).await,
        Error::Unauthorized(_)
    );
    // The legitimate newest token is dead too, and so is the attacker's.
    let t3 = refresh(&user, &fam, "t3", at(30));
    assert_err!(
        store.rotate_refresh_token(&t2.hash, &t3, at(30)).await,
        Error::Unauthorized(_)
    );
    let s2 = refresh(&user, &fam, "s2", at(31));
    assert_err!(
        store.rotate_refresh_token(&stolen.hash, &s2, at(31)).await,
        Error::Unauthorized(_)
    );
    // Another sign-in of the same user is unaffected.
    let o2 = refresh(&user, &other_fam, "o2", at(40));
    assert_eq!(
        store
            .rotate_refresh_token(&o1.hash, &o2, at(40))
            .await
            .unwrap(),
        user
    );
}

/// Expired tokens and tokens of a revoked family do not rotate.
pub async fn refresh_token_expiry_and_revocation(store: Arc<dyn Store>) {
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    let next = refresh(&user, &fam, "t2", t1.expires_at);
    assert_err!(
        store
            .rotate_refresh_token(&t1.hash, &next, t1.expires_at)
            .await,
        Error::Unauthorized(_)
    );

    let fam2 = TokenFamilyId::generate();
    let u1 = refresh(&user, &fam2, "u1", at(0));
    store.create_refresh_token(&u1).await.unwrap();
    store.revoke_token_family(&fam2).await.unwrap();
    assert_err!(
        store
            .rotate_refresh_token(&u1.hash, &refresh(&user, &fam2, "u2", at(1)), at(1))
            .await,
        Error::Unauthorized(_)
    );
}

/// Housekeeping deletes the refresh tokens that expired before the cut, used
/// or not; later ones keep working, and a revoked family with a live token
/// stays revoked.
pub async fn expired_refresh_tokens_are_pruned(store: Arc<dyn Store>) {
    let day = 86_400_000;
    let user = UserId::generate();
    let fam = TokenFamilyId::generate();
    let t1 = refresh(&user, &fam, "t1", at(0));
    store.create_refresh_token(&t1).await.unwrap();
    let t2 = refresh(&user, &fam, "t2", at(10));
    store
        .rotate_refresh_token(&t1.hash, &t2, at(10))
        .await
        .unwrap();
    let ended = TokenFamilyId::generate();
    let u1 = refresh(&user, &ended, "u1", at(0));
    store.create_refresh_token(&u1).await.unwrap();
    store.revoke_token_family(&ended).await.unwrap();
    let revoked = TokenFamilyId::generate();
    let v1 = refresh(&user, &revoked, "v1", at(day));
    store.create_refresh_token(&v1).await.unwrap();
    store.revoke_token_family(&revoked).await.unwrap();

    // t1 (used) and u1 expired at `day`; t2 and v1 later.
    assert_eq!(store.prune_refresh_tokens(at(day + 5)).await.unwrap(), 2);
    assert_eq!(store.prune_refresh_tokens(at(day + 5)).await.unwrap(), 0);
    for gone in [&t1, &u1] {
        assert_err!(
            store.refresh_token_family(&gone.hash).await,
            Error::NotFound(_)
        );
    }
    assert_eq!(store.refresh_token_family(&t2.hash).await.unwrap(), fam);
    let t3 = refresh(&user, &fam, "t3", at(day + 6));
    assert_eq!(
        store
            .rotate_refresh_token(&t2.hash, &t3, at(day + 6))
            .await
            .unwrap(),
        user
    );
    assert_err!(
        store
            .rotate_refresh_token(
                &v1.hash,
                &refresh(&user, &revoked, "v2", at(day + 7)),
                at(day + 7)
            )
            .await,
        Error::Unauthorized(_)
    );
}
