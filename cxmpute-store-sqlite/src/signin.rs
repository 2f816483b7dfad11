//! [`SignInStore`] for [`SqliteStore`]: sign-in codes and refresh tokens
//! (tables `login_codes`, `login_code_issues`, `refresh_tokens`,
//! `revoked_token_families`).
//!
//! Checking a code and rotating a token keep some writes even when they
//! answer an error (a wrong try counts; a reused token revokes its family),
//! so they run through the writer's `write_keeping`.

use async_trait::async_trait;
use cxmpute_core::secret::KeyHash;
use cxmpute_core::store_support::found;
use cxmpute_core::*;

use crate::error::map;
use crate::rows::{self, col};
use crate::sql::*;
use crate::writer::Outcome;
use crate::SqliteStore;

#[async_trait]
impl SignInStore for SqliteStore {
    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        let code = code.clone();
        self.writer
            .write(move |c| {
                Box::pin(
                    async move { issue_login_code(c, &code, window_start, max_per_window).await },
                )
            })
            .await
    }

    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        let (email, hash) = (email.to_owned(), *code_hash);
        self.writer
            .write_keeping(move |c| {
                Box::pin(
                    async move { verify_login_code(c, &email, &hash, now, max_attempts).await },
                )
            })
            .await
    }

    async fn prune_login_codes(&self, before: Timestamp) -> Result<u64> {
        self.writer
            .write(move |c| Box::pin(async move { prune_login_codes(c, before).await }))
            .await
    }

    async fn create_refresh_token(&self, token: &RefreshToken) -> Result<()> {
        let token = token.clone();
        self.writer
            .write(move |c| Box::pin(async move { create_refresh_token(c, &token).await }))
            .await
    }

    async fn prune_refresh_tokens(&self, before: Timestamp) -> Result<u64> {
        self.writer
            .write(move |c| Box::pin(async move { prune_refresh_tokens(c, before).await }))
            .await
    }

    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        let (old, next) = (*old, next.clone());
        self.writer
            .write_keeping(move |c| {
                Box::pin(async move { rotate_refresh_token(c, &old, &next, now).await })
            })
            .await
    }

    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()> {
        let family = family.clone();
        self.writer
            .write(move |c| Box::pin(async move { revoke_token_family(c, family.as_str()).await }))
            .await
    }

    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        let hash = *hash;
        self.read(move |c| Box::pin(async move { refresh_token_family(c, &hash).await }))
            .await
    }
}

// ---- sign-in codes ----------------------------------------------------------

async fn issue_login_code(
    c: &mut Conn,
    code: &LoginCode,
    window_start: Timestamp,
    max_per_window: u32,
) -> Result<()> {
    // Issues older than the window no longer count; forget them.
    let q = sqlx::query(
        "DELETE FROM login_code_issues WHERE email = ? AND at < ?; \
         SELECT count(*) FROM login_code_issues WHERE email = ? AND at >= ?",
    )
    .bind(&code.email)
    .bind(window_start.0)
    .bind(&code.email)
    .bind(window_start.0);
    let row = q
        .fetch_one(&mut *c)
        .await
        .map_err(|e| map("counting sign-in codes", e))?;
    if col::<i64>(&row, 0)? >= i64::from(max_per_window) {
        return Err(Error::RateLimited(
            "too many sign-in codes requested".into(),
        ));
    }
    let q = sqlx::query(
        "INSERT INTO login_code_issues (email, at) VALUES (?, ?); \
         INSERT INTO login_codes (email, code_hash, expires_at, created_at, attempts) \
         VALUES (?, ?, ?, ?, 0) ON CONFLICT (email) DO UPDATE SET \
         code_hash = excluded.code_hash, expires_at = excluded.expires_at, \
         created_at = excluded.created_at, attempts = 0",
    )
    .bind(&code.email)
    .bind(code.created_at.0)
    .bind(&code.email)
    .bind(&code.code_hash.0[..])
    .bind(code.expires_at.0)
    .bind(code.created_at.0);
    execute(c, "storing a sign-in code", q).await.map(drop)
}

async fn verify_login_code(
    c: &mut Conn,
    email: &str,
    code_hash: &KeyHash,
    now: Timestamp,
    max_attempts: u32,
) -> Outcome<()> {
    let bad = || Error::Unauthorized("invalid or expired code".into());
    let q = sqlx::query("SELECT code_hash, expires_at, attempts FROM login_codes WHERE email = ?1")
        .bind(email);
    let Some(row) = fetch_optional(c, "reading a sign-in code", q).await? else {
        return Ok(Err(bad()));
    };
    let stored = rows::key_hash(col(&row, 0)?)?;
    let expires_at = Timestamp(col(&row, 1)?);
    let attempts: i64 = col(&row, 2)?;
    if expires_at <= now || attempts >= i64::from(max_attempts) {
        return Ok(Err(bad()));
    }
    // KeyHash compares in constant time.
    if stored != *code_hash {
        let q = sqlx::query("UPDATE login_codes SET attempts = attempts + 1 WHERE email = ?1")
            .bind(email);
        execute(c, "counting a wrong sign-in code", q).await?;
        // Kept: the wrong try counts even though the answer is an error.
        return Ok(Err(bad()));
    }
    let q = sqlx::query("DELETE FROM login_codes WHERE email = ?1").bind(email);
    execute(c, "consuming a sign-in code", q).await?;
    Ok(Ok(()))
}

async fn prune_login_codes(c: &mut Conn, before: Timestamp) -> Result<u64> {
    // Both tables are small (what the rate limits let through in a window),
    // so a scan each maintenance round costs little and needs no index.
    let q = sqlx::query("DELETE FROM login_codes WHERE created_at < ?1").bind(before.0);
    let pruned = execute(c, "deleting old sign-in codes", q).await?;
    let q = sqlx::query("DELETE FROM login_code_issues WHERE at < ?1").bind(before.0);
    execute(c, "deleting old sign-in code issues", q).await?;
    Ok(pruned)
}

// ---- refresh tokens ---------------------------------------------------------

async fn create_refresh_token(c: &mut Conn, t: &RefreshToken) -> Result<()> {
    let q = sqlx::query(
        "INSERT INTO refresh_tokens (hash, family, user_id, expires_at, created_at, used) \
         VALUES (?1, ?2, ?3, ?4, ?5, 0)",
    )
    .bind(&t.hash.0[..])
    .bind(t.family.as_str())
    .bind(t.user_id.as_str())
    .bind(t.expires_at.0)
    .bind(t.created_at.0);
    execute(c, "refresh token", q).await.map(drop)
}

async fn prune_refresh_tokens(c: &mut Conn, before: Timestamp) -> Result<u64> {
    // First the revocations of families whose every token expires now (the
    // expiry index finds them), then the tokens.
    let q = sqlx::query(
        "DELETE FROM revoked_token_families WHERE family IN \
         (SELECT family FROM refresh_tokens WHERE expires_at < ?1) \
         AND NOT EXISTS (SELECT 1 FROM refresh_tokens t \
         WHERE t.family = revoked_token_families.family AND t.expires_at >= ?1)",
    )
    .bind(before.0);
    execute(c, "deleting revocations of ended sessions", q).await?;
    let q = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < ?1").bind(before.0);
    execute(c, "deleting expired refresh tokens", q).await
}

async fn rotate_refresh_token(
    c: &mut Conn,
    old: &KeyHash,
    next: &RefreshToken,
    now: Timestamp,
) -> Outcome<UserId> {
    let bad = || Error::Unauthorized("invalid refresh token".into());
    let q = sqlx::query(
        "SELECT t.family, t.user_id, t.expires_at, t.used, \
         EXISTS (SELECT 1 FROM revoked_token_families f WHERE f.family = t.family) \
         FROM refresh_tokens t WHERE t.hash = ?1",
    )
    .bind(&old.0[..]);
    let Some(row) = fetch_optional(c, "reading a refresh token", q).await? else {
        return Ok(Err(bad()));
    };
    let family: String = col(&row, 0)?;
    let user = UserId::new(col::<String>(&row, 1)?);
    let expires_at = Timestamp(col(&row, 2)?);
    let used: bool = col(&row, 3)?;
    let revoked: bool = col(&row, 4)?;
    if revoked {
        return Ok(Err(bad()));
    }
    if used {
        // Someone replayed a spent token: end the whole session, kept even
        // though the answer is an error.
        revoke_token_family(c, &family).await?;
        return Ok(Err(Error::Unauthorized(
            "refresh token reused; session revoked".into(),
        )));
    }
    if expires_at <= now {
        return Ok(Err(bad()));
    }
    let q = sqlx::query(
        "UPDATE refresh_tokens SET used = 1 WHERE hash = ?; \
         INSERT INTO refresh_tokens (hash, family, user_id, expires_at, created_at, used) \
         VALUES (?, ?, ?, ?, ?, 0)",
    )
    .bind(&old.0[..])
    .bind(&next.hash.0[..])
    // The new token joins the old one's family whatever the caller said.
    .bind(&family)
    .bind(next.user_id.as_str())
    .bind(next.expires_at.0)
    .bind(next.created_at.0);
    execute(c, "refresh token", q).await?;
    Ok(Ok(user))
}

async fn revoke_token_family(c: &mut Conn, family: &str) -> Result<()> {
    let q = sqlx::query("INSERT OR IGNORE INTO revoked_token_families (family) VALUES (?1)")
        .bind(family);
    execute(c, "revoking a session", q).await.map(drop)
}

async fn refresh_token_family(c: &mut Conn, hash: &KeyHash) -> Result<TokenFamilyId> {
    let q = sqlx::query("SELECT family FROM refresh_tokens WHERE hash = ?1").bind(&hash.0[..]);
    let row = fetch_optional(c, "reading a refresh token", q).await?;
    let row = found(row, || "refresh token".into())?;
    Ok(TokenFamilyId::new(col::<String>(&row, 0)?))
}
