//! [`UserStore`] for [`SqliteStore`]: users and their API keys (tables
//! `users` and `api_keys`).

use async_trait::async_trait;
use cxmpute_core::secret::KeyHash;
use cxmpute_core::store_support::{apply_key_update, found};
use cxmpute_core::*;

use crate::rows::{self, key_cols, limit, user_cols};
use crate::sql::*;
use crate::SqliteStore;

#[async_trait]
impl UserStore for SqliteStore {
    async fn create_user(&self, user: &User) -> Result<()> {
        let user = user.clone();
        self.writer
            .write(move |c| Box::pin(async move { create_user(c, &user).await }))
            .await
    }

    async fn user(&self, id: &UserId) -> Result<User> {
        let id = id.clone();
        self.read(move |c| Box::pin(async move { user(c, id.as_str()).await }))
            .await
    }

    async fn user_by_email(&self, email: &str) -> Result<User> {
        let email = email.to_owned();
        self.read(move |c| Box::pin(async move { user_by_email(c, &email).await }))
            .await
    }

    async fn search_users(&self, query: &str, limit: usize) -> Result<Vec<User>> {
        let query = query.to_owned();
        self.read(move |c| Box::pin(async move { search_users(c, &query, limit).await }))
            .await
    }

    async fn set_user_suspended(&self, id: &UserId, suspension: Option<Suspension>) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| {
                Box::pin(async move { set_user_suspended(c, id.as_str(), &suspension).await })
            })
            .await
    }

    async fn update_user_settings(&self, id: &UserId, update: &UserSettingsUpdate) -> Result<User> {
        let (id, update) = (id.clone(), *update);
        self.writer
            .write(move |c| {
                Box::pin(async move { update_user_settings(c, id.as_str(), &update).await })
            })
            .await
    }

    async fn swap_alert_mark(
        &self,
        id: &UserId,
        kind: AlertKind,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
    ) -> Result<bool> {
        let id = id.clone();
        self.writer
            .write(move |c| {
                Box::pin(async move { swap_alert_mark(c, id.as_str(), kind, from, to).await })
            })
            .await
    }

    async fn create_api_key(&self, key: &ApiKey) -> Result<()> {
        let key = key.clone();
        self.writer
            .write(move |c| Box::pin(async move { create_api_key(c, &key).await }))
            .await
    }

    async fn api_key_by_hash(&self, hash: &KeyHash) -> Result<ApiKey> {
        let hash = *hash;
        self.read(move |c| Box::pin(async move { api_key_by_hash(c, &hash).await }))
            .await
    }

    async fn api_keys(&self, user: &UserId) -> Result<Vec<ApiKey>> {
        let user = user.clone();
        self.read(move |c| Box::pin(async move { api_keys(c, user.as_str()).await }))
            .await
    }

    async fn update_api_key(&self, id: &ApiKeyId, update: &ApiKeyUpdate) -> Result<ApiKey> {
        let (id, update) = (id.clone(), update.clone());
        self.writer
            .write(move |c| Box::pin(async move { update_api_key(c, id.as_str(), &update).await }))
            .await
    }

    async fn revoke_api_key(&self, id: &ApiKeyId, at: Timestamp) -> Result<()> {
        let id = id.clone();
        self.writer
            .write(move |c| Box::pin(async move { revoke_api_key(c, id.as_str(), at).await }))
            .await
    }

    async fn add_rate_usage(
        &self,
        scope: &str,
        window: Timestamp,
        add: RateUsage,
    ) -> Result<Option<RateUsage>> {
        let scope = scope.to_owned();
        self.writer
            .write(move |c| Box::pin(async move { add_rate_usage(c, &scope, window, add).await }))
            .await
    }
}

// ---- users ------------------------------------------------------------------

async fn create_user(c: &mut Conn, u: &User) -> Result<()> {
    let (reason, by, at) = rows::suspension_cols(&u.suspended);
    let q = sqlx::query(
        "INSERT INTO users (id, email, credits, is_admin, suspended_reason, suspended_by, \
         suspended_at, created_at, budget_limit, budget_period, alert_balance_below, \
         alert_budget_percent, alerted_balance, alerted_budget) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )
    .bind(u.id.as_str())
    .bind(&u.email)
    .bind(u.credits.0)
    .bind(u.is_admin)
    .bind(reason)
    .bind(by)
    .bind(at)
    .bind(u.created_at.0)
    .bind(u.budget.map(|b| b.limit.0))
    .bind(u.budget.map(|b| b.period.as_str()))
    .bind(u.alerts.balance_below.map(|c| c.0))
    .bind(u.alerts.budget_percent.map(i64::from))
    .bind(u.alerted.balance.map(|t| t.0))
    .bind(u.alerted.budget.map(|t| t.0));
    execute(c, &format!("user {}", u.email), q).await.map(drop)
}

async fn update_user_settings(c: &mut Conn, id: &str, up: &UserSettingsUpdate) -> Result<User> {
    let mut u = user(c, id).await?;
    if let Some(budget) = up.budget {
        u.budget = budget;
    }
    if let Some(alerts) = up.alerts {
        u.alerts = alerts;
    }
    let q = sqlx::query(
        "UPDATE users SET budget_limit = ?2, budget_period = ?3, alert_balance_below = ?4, \
         alert_budget_percent = ?5 WHERE id = ?1",
    )
    .bind(id)
    .bind(u.budget.map(|b| b.limit.0))
    .bind(u.budget.map(|b| b.period.as_str()))
    .bind(u.alerts.balance_below.map(|c| c.0))
    .bind(u.alerts.budget_percent.map(i64::from));
    execute(c, "updating a user's settings", q).await?;
    Ok(u)
}

async fn swap_alert_mark(
    c: &mut Conn,
    id: &str,
    kind: AlertKind,
    from: Option<Timestamp>,
    to: Option<Timestamp>,
) -> Result<bool> {
    let col = rows::alert_mark_col(kind);
    // `IS` compares NULL as a value: "no mark" is a state to swap from too.
    let sql = format!("UPDATE users SET {col} = ?2 WHERE id = ?1 AND {col} IS ?3");
    let q = sqlx::query(&sql)
        .bind(id)
        .bind(to.map(|t| t.0))
        .bind(from.map(|t| t.0));
    Ok(execute(c, "swapping an alert mark", q).await? == 1)
}

const USER_BY_ID: &str = concat!("SELECT ", user_cols!(), " FROM users u WHERE u.id = ?1");

const USER_BY_EMAIL: &str = concat!("SELECT ", user_cols!(), " FROM users u WHERE u.email = ?1");

const USER_SEARCH: &str = concat!(
    "SELECT ",
    user_cols!(),
    " FROM users u ",
    "WHERE instr(u.email, ?1) > 0 ORDER BY u.email LIMIT ?2"
);

async fn user(c: &mut Conn, id: &str) -> Result<User> {
    let row = fetch_optional(c, "reading a user", sqlx::query(USER_BY_ID).bind(id)).await?;
    rows::user(&found(row, || format!("user {id}"))?, 0)
}

async fn user_by_email(c: &mut Conn, email: &str) -> Result<User> {
    let row = fetch_optional(c, "reading a user", sqlx::query(USER_BY_EMAIL).bind(email)).await?;
    rows::user(&found(row, || format!("user {email}"))?, 0)
}

async fn search_users(c: &mut Conn, query: &str, n: usize) -> Result<Vec<User>> {
    // Lower-cased here (Unicode-aware) and matched with instr(), which,
    // unlike LIKE, gives `%` and `_` no special meaning.
    let q = query.to_lowercase();
    let found = fetch_all(
        c,
        "searching users",
        sqlx::query(USER_SEARCH).bind(q).bind(limit(n)),
    )
    .await?;
    found.iter().map(|r| rows::user(r, 0)).collect()
}

async fn set_user_suspended(c: &mut Conn, id: &str, s: &Option<Suspension>) -> Result<()> {
    set_suspended(c, "users", "user", id, s).await
}

// ---- API keys ---------------------------------------------------------------

async fn create_api_key(c: &mut Conn, k: &ApiKey) -> Result<()> {
    if !exists(
        c,
        "checking a user",
        "SELECT EXISTS (SELECT 1 FROM users WHERE id = ?1)",
        k.user_id.as_str(),
    )
    .await?
    {
        return Err(Error::NotFound(format!("user {}", k.user_id)));
    }
    let q = sqlx::query(
        "INSERT INTO api_keys (id, user_id, hash, name, prefix, credit_limit, credits_left, \
         permitted_routes, created_at, last_used_at, revoked_at, rpm, tpm, \
         budget_limit, budget_period, cache_ttl_secs, cache_shared) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )
    .bind(k.id.as_str())
    .bind(k.user_id.as_str())
    .bind(&k.hash.0[..])
    .bind(&k.name)
    .bind(&k.prefix)
    .bind(k.credit_limit.map(|c| c.0))
    .bind(k.credits_left.map(|c| c.0))
    .bind(rows::routes_json(&k.permitted_routes))
    .bind(k.created_at.0)
    .bind(k.last_used_at.map(|t| t.0))
    .bind(k.revoked_at.map(|t| t.0))
    .bind(k.rate_limits.rpm)
    .bind(k.rate_limits.tpm.map(rows::to_i64))
    .bind(k.budget.map(|b| b.limit.0))
    .bind(k.budget.map(|b| b.period.as_str()))
    .bind(k.cache.ttl_secs)
    .bind(k.cache.shared);
    execute(c, &format!("api key {}", k.id), q).await.map(drop)
}

const KEY_BY_HASH: &str = concat!("SELECT ", key_cols!(), " FROM api_keys k WHERE k.hash = ?1");

const KEY_BY_ID: &str = concat!("SELECT ", key_cols!(), " FROM api_keys k WHERE k.id = ?1");

const KEYS_BY_USER: &str = concat!(
    "SELECT ",
    key_cols!(),
    " FROM api_keys k ",
    "WHERE k.user_id = ?1 ORDER BY k.created_at, k.id"
);

async fn api_key_by_hash(c: &mut Conn, hash: &KeyHash) -> Result<ApiKey> {
    let row = fetch_optional(
        c,
        "reading an api key",
        sqlx::query(KEY_BY_HASH).bind(&hash.0[..]),
    )
    .await?;
    rows::api_key(&found(row, || "api key".into())?, 0)
}

async fn api_keys(c: &mut Conn, user: &str) -> Result<Vec<ApiKey>> {
    let found = fetch_all(c, "reading api keys", sqlx::query(KEYS_BY_USER).bind(user)).await?;
    found.iter().map(|r| rows::api_key(r, 0)).collect()
}

async fn update_api_key(c: &mut Conn, id: &str, u: &ApiKeyUpdate) -> Result<ApiKey> {
    let row = fetch_optional(c, "reading an api key", sqlx::query(KEY_BY_ID).bind(id)).await?;
    let mut k = rows::api_key(&found(row, || format!("api key {id}"))?, 0)?;
    apply_key_update(&mut k, u);
    let q = sqlx::query(
        "UPDATE api_keys SET name = ?2, credit_limit = ?3, credits_left = ?4, \
         permitted_routes = ?5, rpm = ?6, tpm = ?7, budget_limit = ?8, budget_period = ?9, \
         cache_ttl_secs = ?10, cache_shared = ?11 WHERE id = ?1",
    )
    .bind(id)
    .bind(&k.name)
    .bind(k.credit_limit.map(|c| c.0))
    .bind(k.credits_left.map(|c| c.0))
    .bind(rows::routes_json(&k.permitted_routes))
    .bind(k.rate_limits.rpm)
    .bind(k.rate_limits.tpm.map(rows::to_i64))
    .bind(k.budget.map(|b| b.limit.0))
    .bind(k.budget.map(|b| b.period.as_str()))
    .bind(k.cache.ttl_secs)
    .bind(k.cache.shared);
    execute(c, "updating an api key", q).await?;
    Ok(k)
}

async fn revoke_api_key(c: &mut Conn, id: &str, at: Timestamp) -> Result<()> {
    // The first revocation's time stays: revoking again changes nothing.
    let q = sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1")
        .bind(id)
        .bind(at.0);
    execute_found(c, "revoking an api key", q, || format!("api key {id}")).await
}

// ---- rate counters ----------------------------------------------------------

/// One statement: a new scope, the same window (added to) or a later one
/// (started again); a stored later window matches no row and is left alone.
const ADD_RATE_USAGE: &str = "INSERT INTO rate_counters (scope, window_start, requests, tokens) \
     VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (scope) DO UPDATE SET \
       requests = CASE WHEN window_start = excluded.window_start \
         THEN requests + excluded.requests ELSE excluded.requests END, \
       tokens = CASE WHEN window_start = excluded.window_start \
         THEN tokens + excluded.tokens ELSE excluded.tokens END, \
       window_start = excluded.window_start \
     WHERE window_start <= excluded.window_start \
     RETURNING requests, tokens";

async fn add_rate_usage(
    c: &mut Conn,
    scope: &str,
    window: Timestamp,
    add: RateUsage,
) -> Result<Option<RateUsage>> {
    let q = sqlx::query(ADD_RATE_USAGE)
        .bind(scope)
        .bind(window.0)
        .bind(rows::to_i64(add.requests))
        .bind(rows::to_i64(add.tokens));
    let Some(row) = fetch_optional(c, "counting a rate window", q).await? else {
        return Ok(None);
    };
    let count = |i: usize| rows::col::<i64>(&row, i).map(rows::to_u64);
    Ok(Some(RateUsage {
        requests: count(0)?,
        tokens: count(1)?,
    }))
}
