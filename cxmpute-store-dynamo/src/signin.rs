//! Sign-in codes and refresh tokens, off the request path.
//!
//! Issuing a code and rotating a token are optimistic: they write under a
//! condition on what they read and read again when it fails. The
//! housekeeping sweeps find old codes and expired tokens through the index,
//! a bounded batch per maintenance round.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use cxmpute_core::{
    Error, KeyHash, LoginCode, RefreshToken, Result, SignInStore, Timestamp, TokenFamilyId, UserId,
};

use crate::db::{DynamoStore, Fail, Query, Tx};
use crate::item::{n, s, sortable_i64, Ex, Item, ItemBuilder, Rd, PK, SK};
use crate::schema::{self, GSI, GSI_PK, GSI_SK};

/// Emails the sign-in housekeeping looks at per round.
const PRUNE_BATCH: usize = 1_000;

#[async_trait]
impl SignInStore for DynamoStore {
    // ---- sign-in codes ------------------------------------------------------

    async fn issue_login_code(
        &self,
        code: &LoginCode,
        window_start: Timestamp,
        max_per_window: u32,
    ) -> Result<()> {
        let what = "issuing a sign-in code";
        let mut attempt = 0;
        loop {
            let (mut issued, ver) = match self.get(what, schema::login_issued(&code.email)).await? {
                Some(it) => {
                    let r = Rd::new(&it, "sign-in issues");
                    (r.json::<Vec<i64>>("issued")?, Some(r.num::<u64>("ver")?))
                }
                None => (Vec::new(), None),
            };
            issued.retain(|t| *t >= window_start.0);
            if issued.len() >= max_per_window as usize {
                return Err(Error::RateLimited(
                    "too many sign-in codes requested".into(),
                ));
            }
            issued.push(code.created_at.0);
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            // The count was made from what was read: write only if nobody
            // issued a code for this email since.
            let cond = match ver {
                Some(v) => format!("{} = {}", ex.n("ver"), ex.v(n(v))),
                None => ex.absent(),
            };
            // In the index by its latest issue, for the housekeeping sweep.
            let issues = ItemBuilder::at(schema::login_issued(&code.email))
                .json("issued", &issued)?
                .n("ver", ver.map_or(0, |v| v + 1))
                .s(GSI_PK, schema::LOGINS_PK)
                .s(
                    GSI_SK,
                    format!("{}#{}", sortable_i64(code.created_at.0), code.email),
                )
                .build();
            tx.put(issues, Some(cond), ex)?;
            let c = ItemBuilder::at(schema::login_code(&code.email))
                .s("email", &code.email)
                .s("code_hash", code.code_hash.to_hex())
                .n("expires_at", code.expires_at.0)
                .n("created_at", code.created_at.0)
                .n("attempts", 0)
                .build();
            tx.put(c, None, Ex::new())?;
            match self.transact(what, tx).await {
                Ok(()) => return Ok(()),
                Err(Fail::Condition(_)) => self.again(&mut attempt, what).await?,
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    async fn verify_login_code(
        &self,
        email: &str,
        code_hash: &KeyHash,
        now: Timestamp,
        max_attempts: u32,
    ) -> Result<()> {
        let what = "verifying a sign-in code";
        let bad = || Error::Unauthorized("invalid or expired code".into());
        let it = self
            .get(what, schema::login_code(email))
            .await?
            .ok_or_else(bad)?;
        let r = Rd::new(&it, "sign-in code");
        let stored = r.hash("code_hash")?;
        let created_at: i64 = r.num("created_at")?;
        let expires_at: i64 = r.num("expires_at")?;
        let attempts: u64 = r.num("attempts")?;
        if expires_at <= now.0 || attempts >= u64::from(max_attempts) {
            return Err(bad());
        }
        if stored != *code_hash {
            // Count the wrong try against this code (not one issued since).
            let mut ex = Ex::new();
            let upd = format!("ADD {} {}", ex.n("attempts"), ex.v(n(1)));
            let cond = format!(
                "{} = {} AND {} = {}",
                ex.n("created_at"),
                ex.v(n(created_at)),
                ex.n("code_hash"),
                ex.v(s(stored.to_hex()))
            );
            match self
                .update(what, schema::login_code(email), upd, Some(cond), ex, false)
                .await
            {
                Ok(_) | Err(Fail::Condition(_)) => return Err(bad()),
                Err(f) => return Err(f.into_error(what)),
            }
        }
        // Consume it only if it is still this code, unexpired and not locked
        // by wrong tries made since the read.
        let mut ex = Ex::new();
        let attempts_n = ex.n("attempts");
        let cond = format!(
            "{} = {} AND {attempts_n} < {} AND {} > {}",
            ex.n("code_hash"),
            ex.v(s(code_hash.to_hex())),
            ex.v(n(max_attempts)),
            ex.n("expires_at"),
            ex.v(n(now.0))
        );
        match self
            .delete(what, schema::login_code(email), Some(cond), ex)
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(bad()),
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn prune_login_codes(&self, before: Timestamp) -> Result<u64> {
        let what = "deleting old sign-in codes";
        // Sort key `{latest issue}#{email}`, fixed-width time: everything
        // below the bare time of `before` was last issued earlier.
        let q = older_than(schema::LOGINS_PK, before);
        let mut pruned = 0;
        // The index lags; each email is read again and deleted only if
        // nothing was issued for it since (`ver` unchanged).
        for it in self.query(what, q).await? {
            let pk = Rd::new(&it, "sign-in issues").s(PK)?;
            let Some(email) = pk.strip_prefix("LOGIN#") else {
                continue;
            };
            let Some(issues) = self.get(what, schema::login_issued(email)).await? else {
                continue;
            };
            let r = Rd::new(&issues, "sign-in issues");
            let latest = r.json::<Vec<i64>>("issued")?.into_iter().max();
            if latest.is_some_and(|t| t >= before.0) {
                continue;
            }
            let mut ex = Ex::new();
            let cond = format!("{} = {}", ex.n("ver"), ex.v(n(r.num::<u64>("ver")?)));
            match self
                .delete(what, schema::login_issued(email), Some(cond), ex)
                .await
            {
                Ok(()) => {}
                Err(Fail::Condition(_)) => continue,
                Err(f) => return Err(f.into_error(what)),
            }
            // The code (if not used) is as old; a newer one issued since
            // the read fails the condition and stays.
            let mut ex = Ex::new();
            let cond = format!("{} < {}", ex.n("created_at"), ex.v(n(before.0)));
            match self
                .delete(what, schema::login_code(email), Some(cond), ex)
                .await
            {
                Ok(()) => pruned += 1,
                Err(Fail::Condition(_)) => {}
                Err(f) => return Err(f.into_error(what)),
            }
        }
        Ok(pruned)
    }

    // ---- refresh tokens -----------------------------------------------------

    async fn create_refresh_token(&self, t: &RefreshToken) -> Result<()> {
        let what = "storing a refresh token";
        let mut ex = Ex::new();
        let cond = ex.absent();
        match self
            .put(what, Self::token_item(t, &t.family), Some(cond), ex)
            .await
        {
            Ok(()) => Ok(()),
            Err(Fail::Condition(_)) => Err(Error::AlreadyExists("refresh token".into())),
            Err(f) => Err(f.into_error(what)),
        }
    }

    async fn prune_refresh_tokens(&self, before: Timestamp) -> Result<u64> {
        let what = "deleting expired refresh tokens";
        let mut pruned = 0;
        for shard in 0..schema::TOKEN_SHARDS {
            let q = older_than(&schema::tokens_shard_pk(shard), before);
            for it in self.query(what, q).await? {
                let r = Rd::new(&it, "refresh token");
                let key = crate::item::key(r.s(PK)?, r.s(SK)?);
                let mut ex = Ex::new();
                let cond = format!("{} < {}", ex.n("expires_at"), ex.v(n(before.0)));
                match self.delete(what, key, Some(cond), ex).await {
                    Ok(()) => pruned += 1,
                    Err(Fail::Condition(_)) => {}
                    Err(f) => return Err(f.into_error(what)),
                }
            }
        }
        // Revocation items stay: without an index of tokens by family, which
        // every rotation would write, a sweep cannot tell when a family's
        // last token is gone. There is one per ended session.
        Ok(pruned)
    }

    async fn rotate_refresh_token(
        &self,
        old: &KeyHash,
        next: &RefreshToken,
        now: Timestamp,
    ) -> Result<UserId> {
        let what = "rotating a refresh token";
        let bad = || Error::Unauthorized("invalid refresh token".into());
        let mut attempt = 0;
        loop {
            let it = self
                .get(what, schema::refresh_token(old))
                .await?
                .ok_or_else(bad)?;
            let r = Rd::new(&it, "refresh token");
            let family = TokenFamilyId::new(r.s("family")?);
            let user = UserId::new(r.s("user_id")?);
            let used = r.b("used")?;
            let expires_at: i64 = r.num("expires_at")?;
            let revoked = match self.get(what, schema::token_family(&family)).await? {
                Some(f) => Rd::new(&f, "token family").b("revoked")?,
                None => false,
            };
            if revoked {
                return Err(bad());
            }
            if used {
                // A used token presented again was stolen or replayed: end the session.
                self.revoke_token_family(&family).await?;
                return Err(Error::Unauthorized(
                    "refresh token reused; session revoked".into(),
                ));
            }
            if expires_at <= now.0 {
                return Err(bad());
            }
            if next.hash == *old {
                return Err(Error::AlreadyExists("refresh token".into()));
            }
            let mut tx = Tx::new(self);
            let mut ex = Ex::new();
            let u = ex.n("used");
            let upd = format!("SET {u} = {}", ex.v(AttributeValue::Bool(true)));
            let cond = format!("{u} = {}", ex.v(AttributeValue::Bool(false)));
            tx.update(schema::refresh_token(old), upd, Some(cond), ex)?;
            let mut ex = Ex::new();
            let cond = format!("attribute_not_exists({})", ex.n("revoked"));
            tx.check(schema::token_family(&family), cond, ex)?;
            let mut ex = Ex::new();
            let cond = ex.absent();
            let next_i = tx.put(Self::token_item(next, &family), Some(cond), ex)?;
            match self.transact(what, tx).await {
                Ok(()) => return Ok(user),
                Err(Fail::Condition(flags)) => {
                    if Fail::failed(&flags, next_i)
                        && self
                            .get(what, schema::refresh_token(&next.hash))
                            .await?
                            .is_some()
                    {
                        return Err(Error::AlreadyExists("refresh token".into()));
                    }
                    // Used, revoked or replaced since the read: the next read says which.
                    self.again(&mut attempt, what).await?;
                }
                Err(f) => return Err(f.into_error(what)),
            }
        }
    }

    async fn revoke_token_family(&self, family: &TokenFamilyId) -> Result<()> {
        let what = "revoking a token family";
        let mut ex = Ex::new();
        let upd = format!(
            "SET {} = {}",
            ex.n("revoked"),
            ex.v(AttributeValue::Bool(true))
        );
        self.update(what, schema::token_family(family), upd, None, ex, false)
            .await
            .map(|_| ())
            .map_err(|f| f.into_error(what))
    }

    async fn refresh_token_family(&self, hash: &KeyHash) -> Result<TokenFamilyId> {
        match self
            .get("reading a refresh token", schema::refresh_token(hash))
            .await?
        {
            Some(it) => Ok(TokenFamilyId::new(
                Rd::new(&it, "refresh token").s("family")?,
            )),
            None => Err(Error::NotFound("refresh token".into())),
        }
    }
}

impl DynamoStore {
    fn token_item(t: &RefreshToken, family: &TokenFamilyId) -> Item {
        // In the index by expiry, for the housekeeping sweep; sharded by
        // hash, as every sign-in and refresh writes one.
        ItemBuilder::at(schema::refresh_token(&t.hash))
            .s(GSI_PK, schema::tokens_pk(&t.hash))
            .s(
                GSI_SK,
                format!("{}#{}", sortable_i64(t.expires_at.0), t.hash.to_hex()),
            )
            .s("hash", t.hash.to_hex())
            .s("family", family.as_str())
            .s("user_id", t.user_id.as_str())
            .n("expires_at", t.expires_at.0)
            .n("created_at", t.created_at.0)
            .b("used", false)
            .build()
    }
}

/// A bounded sweep of the index partition `pk` for items whose time-first
/// sort key is below `before`, oldest first: a backlog clears over a few
/// maintenance rounds.
fn older_than(pk: &str, before: Timestamp) -> Query {
    let mut q = Query {
        index: Some(GSI),
        forward: true,
        limit: Some(PRUNE_BATCH),
        ..Query::default()
    };
    q.key_cond = format!(
        "{} = {} AND {} < {}",
        q.ex.n(GSI_PK),
        q.ex.v(s(pk)),
        q.ex.n(GSI_SK),
        q.ex.v(s(sortable_i64(before.0)))
    );
    q
}
