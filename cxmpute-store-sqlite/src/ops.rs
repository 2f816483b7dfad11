//! Every store operation as a function of one connection.
//!
//! Writes run on the writer's connection inside a savepoint of the batch's
//! transaction (see [`crate::writer`]): they read what they need, decide with
//! the core's shared rules, and return `Err` to have their changes undone.
//! Reads run on a read connection.

use std::collections::BTreeMap;

use cxmpute_core::secret::KeyHash;
use cxmpute_core::store::found;
use cxmpute_core::store_support::{
    check_provision_update, granted_balance, moved_credits_left, release_settlement,
};
use cxmpute_core::*;
use sqlx::sqlite::SqliteRow;
use sqlx::SqliteConnection;

use crate::error::map;
use crate::money::{self, MoneyAnswer, MoneyOp};
use crate::rows::{
    self, col, json, key_cols, limit, pool_entry_cols, provider_cols, provision_cols,
    reservation_cols, stats_cols, to_i64, usage_cols, user_cols,
};
use crate::writer::Outcome;

type Conn = SqliteConnection;
type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

async fn fetch_optional<'q>(
    conn: &mut Conn,
    what: &str,
    q: Query<'q>,
) -> Result<Option<SqliteRow>> {
    q.fetch_optional(conn).await.map_err(|e| map(what, e))
}

async fn fetch_all<'q>(conn: &mut Conn, what: &str, q: Query<'q>) -> Result<Vec<SqliteRow>> {
    q.fetch_all(conn).await.map_err(|e| map(what, e))
}

/// Runs a statement and returns how many rows it changed.
async fn execute<'q>(conn: &mut Conn, what: &str, q: Query<'q>) -> Result<u64> {
    q.execute(conn)
        .await
        .map(|r| r.rows_affected())
        .map_err(|e| map(what, e))
}

/// Runs a statement that changes one row by its key; none changed means
/// the row is not there: `NotFound(missing())`.
async fn execute_found<'q>(
    conn: &mut Conn,
    what: &str,
    q: Query<'q>,
    missing: impl FnOnce() -> String,
) -> Result<()> {
    let changed = execute(conn, what, q).await?;
    found((changed > 0).then_some(()), missing)
}

/// Whether `sql` (a `SELECT EXISTS(...)` with one bind) is true.
async fn exists(conn: &mut Conn, what: &str, sql: &'static str, bind: &str) -> Result<bool> {
    let row = sqlx::query(sql)
        .bind(bind)
        .fetch_one(conn)
        .await
        .map_err(|e| map(what, e))?;
    col(&row, 0)
}

// ---- users ---------------------------------------------------------------------

pub(crate) async fn create_user(c: &mut Conn, u: &User) -> Result<()> {
    let (reason, by, at) = rows::suspension_cols(&u.suspended);
    let q = sqlx::query(
        "INSERT INTO users (id, email, credits, is_admin, suspended_reason, suspended_by, \
         suspended_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .bind(u.id.as_str())
    .bind(&u.email)
    .bind(u.credits.0)
    .bind(u.is_admin)
    .bind(reason)
    .bind(by)
    .bind(at)
    .bind(u.created_at.0);
    execute(c, &format!("user {}", u.email), q).await.map(drop)
}

const USER_BY_ID: &str = concat!("SELECT ", user_cols!(), " FROM users u WHERE u.id = ?1");
const USER_BY_EMAIL: &str = concat!("SELECT ", user_cols!(), " FROM users u WHERE u.email = ?1");
const USER_SEARCH: &str = concat!(
    "SELECT ",
    user_cols!(),
    " FROM users u ",
    "WHERE instr(u.email, ?1) > 0 ORDER BY u.email LIMIT ?2"
);

pub(crate) async fn user(c: &mut Conn, id: &str) -> Result<User> {
    let row = fetch_optional(c, "reading a user", sqlx::query(USER_BY_ID).bind(id)).await?;
    rows::user(&found(row, || format!("user {id}"))?, 0)
}

pub(crate) async fn user_by_email(c: &mut Conn, email: &str) -> Result<User> {
    let row = fetch_optional(c, "reading a user", sqlx::query(USER_BY_EMAIL).bind(email)).await?;
    rows::user(&found(row, || format!("user {email}"))?, 0)
}

pub(crate) async fn search_users(c: &mut Conn, query: &str, n: usize) -> Result<Vec<User>> {
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

/// Sets or clears the suspension of the `noun` ("user", "provider") whose
/// row in `table` has id `id`.
async fn set_suspended(
    c: &mut Conn,
    table: &str,
    noun: &str,
    id: &str,
    s: &Option<Suspension>,
) -> Result<()> {
    let (reason, by, at) = rows::suspension_cols(s);
    let sql = format!(
        "UPDATE {table} SET suspended_reason = ?2, suspended_by = ?3, suspended_at = ?4 \
         WHERE id = ?1"
    );
    let q = sqlx::query(&sql).bind(id).bind(reason).bind(by).bind(at);
    let what = format!("suspending a {noun}");
    execute_found(c, &what, q, || format!("{noun} {id}")).await
}

pub(crate) async fn set_user_suspended(
    c: &mut Conn,
    id: &str,
    s: &Option<Suspension>,
) -> Result<()> {
    set_suspended(c, "users", "user", id, s).await
}

pub(crate) async fn grant_credits(c: &mut Conn, g: &CreditGrant) -> Result<Credits> {
    let row = fetch_optional(
        c,
        "reading a balance",
        sqlx::query("SELECT credits FROM users WHERE id = ?1").bind(g.user_id.as_str()),
    )
    .await?;
    let row = found(row, || format!("user {}", g.user_id))?;
    let next = granted_balance(Credits(col(&row, 0)?), g.amount)?;
    let q = sqlx::query(
        "UPDATE users SET credits = ? WHERE id = ?; \
         INSERT INTO credit_grants (user_id, amount, by_whom, reason, at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(next.0)
    .bind(g.user_id.as_str())
    .bind(g.user_id.as_str())
    .bind(g.amount.0)
    .bind(&g.by)
    .bind(&g.reason)
    .bind(g.at.0);
    execute(c, "granting credits", q).await?;
    Ok(next)
}

pub(crate) async fn credit_grants(c: &mut Conn, user: &str) -> Result<Vec<CreditGrant>> {
    let found = fetch_all(
        c,
        "reading credit grants",
        sqlx::query(
            "SELECT user_id, amount, by_whom, reason, at FROM credit_grants \
             WHERE user_id = ?1 ORDER BY seq",
        )
        .bind(user),
    )
    .await?;
    found
        .iter()
        .map(|r| {
            Ok(CreditGrant {
                user_id: UserId::new(col::<String>(r, 0)?),
                amount: Credits(col(r, 1)?),
                by: col(r, 2)?,
                reason: col(r, 3)?,
                at: Timestamp(col(r, 4)?),
            })
        })
        .collect()
}

// ---- API keys --------------------------------------------------------------------

pub(crate) async fn create_api_key(c: &mut Conn, k: &ApiKey) -> Result<()> {
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
         permitted_routes, created_at, last_used_at, revoked_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
    .bind(k.revoked_at.map(|t| t.0));
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

pub(crate) async fn api_key_by_hash(c: &mut Conn, hash: &KeyHash) -> Result<ApiKey> {
    let row = fetch_optional(
        c,
        "reading an api key",
        sqlx::query(KEY_BY_HASH).bind(&hash.0[..]),
    )
    .await?;
    rows::api_key(&found(row, || "api key".into())?, 0)
}

pub(crate) async fn api_keys(c: &mut Conn, user: &str) -> Result<Vec<ApiKey>> {
    let found = fetch_all(c, "reading api keys", sqlx::query(KEYS_BY_USER).bind(user)).await?;
    found.iter().map(|r| rows::api_key(r, 0)).collect()
}

pub(crate) async fn update_api_key(c: &mut Conn, id: &str, u: &ApiKeyUpdate) -> Result<ApiKey> {
    let row = fetch_optional(c, "reading an api key", sqlx::query(KEY_BY_ID).bind(id)).await?;
    let mut k = rows::api_key(&found(row, || format!("api key {id}"))?, 0)?;
    if let Some(name) = &u.name {
        k.name = name.clone();
    }
    if let Some(new_limit) = u.credit_limit {
        k.credits_left = moved_credits_left(k.credit_limit, k.credits_left, new_limit);
        k.credit_limit = new_limit;
    }
    if let Some(routes) = &u.permitted_routes {
        k.permitted_routes = routes.clone();
    }
    let q = sqlx::query(
        "UPDATE api_keys SET name = ?2, credit_limit = ?3, credits_left = ?4, \
         permitted_routes = ?5 WHERE id = ?1",
    )
    .bind(id)
    .bind(&k.name)
    .bind(k.credit_limit.map(|c| c.0))
    .bind(k.credits_left.map(|c| c.0))
    .bind(rows::routes_json(&k.permitted_routes));
    execute(c, "updating an api key", q).await?;
    Ok(k)
}

pub(crate) async fn revoke_api_key(c: &mut Conn, id: &str, at: Timestamp) -> Result<()> {
    // The first revocation's time stays: revoking again changes nothing.
    let q = sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1")
        .bind(id)
        .bind(at.0);
    execute_found(c, "revoking an api key", q, || format!("api key {id}")).await
}

// ---- providers -------------------------------------------------------------------

pub(crate) async fn create_provider(c: &mut Conn, p: &Provider) -> Result<()> {
    let (reason, by, at) = rows::suspension_cols(&p.suspended);
    let q = sqlx::query(
        "INSERT INTO providers (id, user_id, email, key_hash, earnings, suspended_reason, \
         suspended_by, suspended_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .bind(p.id.as_str())
    .bind(p.user_id.as_ref().map(|u| u.as_str()))
    .bind(&p.email)
    .bind(&p.key_hash.0[..])
    .bind(p.earnings.0)
    .bind(reason)
    .bind(by)
    .bind(at)
    .bind(p.created_at.0);
    execute(c, &format!("provider {}", p.id), q).await.map(drop)
}

const PROVIDER_BY: [&str; 3] = [
    concat!(
        "SELECT ",
        provider_cols!(),
        " FROM providers p WHERE p.id = ?1"
    ),
    concat!(
        "SELECT ",
        provider_cols!(),
        " FROM providers p WHERE p.key_hash = ?1"
    ),
    concat!(
        "SELECT ",
        provider_cols!(),
        " FROM providers p WHERE p.user_id = ?1"
    ),
];

pub(crate) async fn provider(c: &mut Conn, id: &str) -> Result<Provider> {
    let row = fetch_optional(
        c,
        "reading a provider",
        sqlx::query(PROVIDER_BY[0]).bind(id),
    )
    .await?;
    rows::provider(&found(row, || format!("provider {id}"))?)
}

pub(crate) async fn provider_by_key_hash(c: &mut Conn, hash: &KeyHash) -> Result<Provider> {
    let q = sqlx::query(PROVIDER_BY[1]).bind(&hash.0[..]);
    let row = fetch_optional(c, "reading a provider", q).await?;
    rows::provider(&found(row, || "provider key".into())?)
}

pub(crate) async fn provider_by_user(c: &mut Conn, user: &str) -> Result<Provider> {
    let row = fetch_optional(
        c,
        "reading a provider",
        sqlx::query(PROVIDER_BY[2]).bind(user),
    )
    .await?;
    rows::provider(&found(row, || format!("provider of {user}"))?)
}

pub(crate) async fn rotate_provider_key(c: &mut Conn, id: &str, new_hash: &KeyHash) -> Result<()> {
    let taken = sqlx::query("SELECT EXISTS (SELECT 1 FROM providers WHERE key_hash = ?1)")
        .bind(&new_hash.0[..])
        .fetch_one(&mut *c)
        .await
        .map_err(|e| map("checking a provider key", e))?;
    if col::<bool>(&taken, 0)? {
        return Err(Error::AlreadyExists("provider key".into()));
    }
    let q = sqlx::query("UPDATE providers SET key_hash = ?2 WHERE id = ?1")
        .bind(id)
        .bind(&new_hash.0[..]);
    execute_found(c, "provider key", q, || format!("provider {id}")).await
}

pub(crate) async fn set_provider_suspended(
    c: &mut Conn,
    id: &str,
    s: &Option<Suspension>,
) -> Result<()> {
    set_suspended(c, "providers", "provider", id, s).await
}

// ---- provisions and pools -----------------------------------------------------------

async fn insert_entries(c: &mut Conn, id: &str, entries: &[PoolEntry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    // All in one statement; an entry's place in the array is its seq.
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.provider_id.as_str(),
                e.service.as_str(),
                e.model.as_str(),
                e.endpoint.as_str(),
                e.node_secret.as_str(),
                i64::from(e.tier),
                e.region.as_str(),
            )
        })
        .collect();
    let q = sqlx::query(concat!(
        "INSERT INTO pool_entries (provision_id, seq, provider_id, service, model, endpoint, ",
        "node_secret, tier, region) SELECT ?1, key, value ->> 0, value ->> 1, value ->> 2, ",
        "value ->> 3, value ->> 4, value ->> 5, value ->> 6 FROM json_each(?2)"
    ))
    .bind(id)
    .bind(json(&rows)?);
    execute(c, "storing a pool entry", q).await.map(drop)
}

async fn delete_entries(c: &mut Conn, id: &str) -> Result<()> {
    let q = sqlx::query("DELETE FROM pool_entries WHERE provision_id = ?1").bind(id);
    execute(c, "deleting pool entries", q).await.map(drop)
}

pub(crate) async fn create_provision(
    c: &mut Conn,
    p: &Provision,
    entries: &[PoolEntry],
) -> Result<()> {
    if !exists(
        c,
        "checking a provider",
        "SELECT EXISTS (SELECT 1 FROM providers WHERE id = ?1)",
        p.provider_id.as_str(),
    )
    .await?
    {
        return Err(Error::NotFound(format!("provider {}", p.provider_id)));
    }
    let q = sqlx::query(
        "INSERT INTO provisions (id, provider_id, endpoint, node_secret, device, country, region, \
         city, tier, state, last_heartbeat, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .bind(p.id.as_str())
    .bind(p.provider_id.as_str())
    .bind(p.endpoint.as_deref())
    .bind(&p.node_secret)
    .bind(p.device.to_string())
    .bind(&p.location.country)
    .bind(&p.location.state)
    .bind(&p.location.city)
    .bind(i64::from(p.tier))
    .bind(p.state.as_str())
    .bind(p.last_heartbeat.0)
    .bind(p.created_at.0);
    execute(c, &format!("provision {}", p.id), q).await?;
    insert_entries(c, p.id.as_str(), entries).await
}

const PROVISIONS: [&str; 3] = [
    concat!(
        "SELECT ",
        provision_cols!(),
        " FROM provisions n WHERE n.id = ?1"
    ),
    concat!(
        "SELECT ",
        provision_cols!(),
        " FROM provisions n ",
        "WHERE n.provider_id = ?1 ORDER BY n.created_at, n.id"
    ),
    concat!(
        "SELECT ",
        provision_cols!(),
        " FROM provisions n ",
        "WHERE n.state <> 'ended' ORDER BY n.created_at, n.id"
    ),
];

pub(crate) async fn provision(c: &mut Conn, id: &str) -> Result<Provision> {
    let row = fetch_optional(
        c,
        "reading a provision",
        sqlx::query(PROVISIONS[0]).bind(id),
    )
    .await?;
    rows::provision(&found(row, || format!("provision {id}"))?)
}

pub(crate) async fn provisions_by_provider(c: &mut Conn, provider: &str) -> Result<Vec<Provision>> {
    let q = sqlx::query(PROVISIONS[1]).bind(provider);
    let found = fetch_all(c, "reading provisions", q).await?;
    found.iter().map(rows::provision).collect()
}

pub(crate) async fn provisions(c: &mut Conn) -> Result<Vec<Provision>> {
    let found = fetch_all(c, "reading provisions", sqlx::query(PROVISIONS[2])).await?;
    found.iter().map(rows::provision).collect()
}

pub(crate) async fn update_provision(
    c: &mut Conn,
    id: &str,
    state: ProvisionState,
    endpoint: Option<&str>,
    entries: &[PoolEntry],
) -> Result<()> {
    check_provision_update(state, entries)?;
    let q = sqlx::query("UPDATE provisions SET state = ?2, endpoint = ?3 WHERE id = ?1")
        .bind(id)
        .bind(state.as_str())
        .bind(endpoint);
    execute_found(c, "updating a provision", q, || format!("provision {id}")).await?;
    delete_entries(c, id).await?;
    insert_entries(c, id, entries).await
}

pub(crate) async fn heartbeat(c: &mut Conn, id: &str, at: Timestamp) -> Result<()> {
    // max(): a heartbeat that arrives late never moves the clock back.
    let q =
        sqlx::query("UPDATE provisions SET last_heartbeat = max(last_heartbeat, ?2) WHERE id = ?1")
            .bind(id)
            .bind(at.0);
    execute_found(c, "recording a heartbeat", q, || format!("provision {id}")).await
}

pub(crate) async fn delete_provision(c: &mut Conn, id: &str) -> Result<()> {
    // Its pool entries go with it: the schema cascades the delete.
    let q = sqlx::query("DELETE FROM provisions WHERE id = ?1").bind(id);
    execute_found(c, "deleting a provision", q, || format!("provision {id}")).await
}

pub(crate) async fn pool_entries(c: &mut Conn) -> Result<Vec<PoolEntry>> {
    let sql = concat!(
        "SELECT ",
        pool_entry_cols!(),
        " FROM pool_entries e ORDER BY e.provision_id, e.seq"
    );
    let found = fetch_all(c, "reading pool entries", sqlx::query(sql)).await?;
    let mut v = found
        .iter()
        .map(rows::pool_entry)
        .collect::<Result<Vec<_>>>()?;
    // The same order as the memory store: by node, then service, then model.
    v.sort_by(|a, b| {
        (&a.provision_id, a.service, &a.model).cmp(&(&b.provision_id, b.service, &b.model))
    });
    Ok(v)
}

pub(crate) async fn expire_provisions(c: &mut Conn, before: Timestamp) -> Result<Vec<ProvisionId>> {
    let q = sqlx::query(
        "UPDATE provisions SET state = 'ended' \
         WHERE state <> 'ended' AND last_heartbeat < ?1 RETURNING id",
    )
    .bind(before.0);
    let ended = fetch_all(c, "expiring provisions", q).await?;
    let ids = ended
        .iter()
        .map(|row| col::<String>(row, 0))
        .collect::<Result<Vec<_>>>()?;
    if !ids.is_empty() {
        let q = sqlx::query(
            "DELETE FROM pool_entries WHERE provision_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json(&ids)?);
        execute(c, "deleting pool entries", q).await?;
    }
    let mut ids: Vec<ProvisionId> = ids.into_iter().map(ProvisionId::new).collect();
    ids.sort();
    Ok(ids)
}

// ---- credits -------------------------------------------------------------------

pub(crate) async fn settlement(c: &mut Conn, request: &str) -> Result<UsageRecord> {
    let sql = concat!(
        "SELECT ",
        usage_cols!(),
        " FROM usage WHERE request_id = ?1"
    );
    let row = fetch_optional(c, "reading a settlement", sqlx::query(sql).bind(request)).await?;
    rows::usage(&found(row, || format!("settlement {request}"))?)
}

pub(crate) async fn release_stale_reservations(c: &mut Conn, before: Timestamp) -> Result<u64> {
    let sql = concat!(
        "SELECT ",
        reservation_cols!(),
        " FROM reservations r WHERE r.created_at < ?1 ORDER BY r.created_at"
    );
    let stale = fetch_all(
        c,
        "reading stale reservations",
        sqlx::query(sql).bind(before.0),
    )
    .await?;
    let releases = stale
        .iter()
        .map(|row| {
            Ok(MoneyOp::Settle(release_settlement(
                &rows::reservation(row, 0)?,
                before,
            )))
        })
        .collect::<Result<Vec<_>>>()?;
    // The same path as every settlement, so a release is one exactly like them.
    let answers = money::apply(c, &releases).await?;
    let mut n = 0;
    for answer in answers {
        if let MoneyAnswer::Settled(SettleOutcome::Applied) = answer? {
            n += 1;
        }
    }
    Ok(n)
}

pub(crate) async fn ledger_totals(c: &mut Conn) -> Result<LedgerTotals> {
    let row =
        sqlx::query("SELECT settlements, charged, rewarded, reserved FROM ledger WHERE id = 1")
            .fetch_one(c)
            .await
            .map_err(|e| map("reading the ledger", e))?;
    Ok(LedgerTotals {
        settlements: rows::to_u64(col(&row, 0)?),
        charged: Credits(col(&row, 1)?),
        rewarded: Credits(col(&row, 2)?),
        reserved: Credits(col(&row, 3)?),
    })
}

pub(crate) async fn usage_records(c: &mut Conn, user: &str, n: usize) -> Result<Vec<UsageRecord>> {
    let sql = concat!(
        "SELECT ",
        usage_cols!(),
        " FROM usage WHERE user_id = ?1 ORDER BY at DESC, request_id DESC LIMIT ?2"
    );
    let q = sqlx::query(sql).bind(user).bind(limit(n));
    let found = fetch_all(c, "reading usage", q).await?;
    found.iter().map(rows::usage).collect()
}

// ---- pricing -------------------------------------------------------------------

pub(crate) async fn prices(c: &mut Conn) -> Result<Vec<PriceEntry>> {
    let sql = concat!(
        "SELECT service, model, per_request, per_million_input_tokens, ",
        "per_million_output_tokens, per_million_units FROM prices"
    );
    let found = fetch_all(c, "reading prices", sqlx::query(sql)).await?;
    let mut v = found.iter().map(rows::price).collect::<Result<Vec<_>>>()?;
    v.sort_by(|a, b| (a.service, &a.model).cmp(&(b.service, &b.model)));
    Ok(v)
}

pub(crate) async fn put_price(c: &mut Conn, p: &PriceEntry) -> Result<()> {
    let model_key = match &p.model {
        Some(m) => format!("={m}"),
        None => String::new(),
    };
    let q = sqlx::query(
        "INSERT INTO prices (service, model_key, model, per_request, per_million_input_tokens, \
         per_million_output_tokens, per_million_units) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
         ON CONFLICT (service, model_key) DO UPDATE SET per_request = excluded.per_request, \
         per_million_input_tokens = excluded.per_million_input_tokens, \
         per_million_output_tokens = excluded.per_million_output_tokens, \
         per_million_units = excluded.per_million_units",
    )
    .bind(p.service.as_str())
    .bind(model_key)
    .bind(p.model.as_deref())
    .bind(p.per_request.0)
    .bind(p.per_million_input_tokens.0)
    .bind(p.per_million_output_tokens.0)
    .bind(p.per_million_units.0);
    execute(c, "storing a price", q).await.map(drop)
}

// ---- sign-in -------------------------------------------------------------------

pub(crate) async fn issue_login_code(
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

pub(crate) async fn verify_login_code(
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

pub(crate) async fn prune_login_codes(c: &mut Conn, before: Timestamp) -> Result<u64> {
    // Both tables are small (what the rate limits let through in a window),
    // so a scan each maintenance round costs little and needs no index.
    let q = sqlx::query("DELETE FROM login_codes WHERE created_at < ?1").bind(before.0);
    let pruned = execute(c, "deleting old sign-in codes", q).await?;
    let q = sqlx::query("DELETE FROM login_code_issues WHERE at < ?1").bind(before.0);
    execute(c, "deleting old sign-in code issues", q).await?;
    Ok(pruned)
}

pub(crate) async fn create_refresh_token(c: &mut Conn, t: &RefreshToken) -> Result<()> {
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

pub(crate) async fn prune_refresh_tokens(c: &mut Conn, before: Timestamp) -> Result<u64> {
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

pub(crate) async fn rotate_refresh_token(
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

pub(crate) async fn revoke_token_family(c: &mut Conn, family: &str) -> Result<()> {
    let q = sqlx::query("INSERT OR IGNORE INTO revoked_token_families (family) VALUES (?1)")
        .bind(family);
    execute(c, "revoking a session", q).await.map(drop)
}

pub(crate) async fn refresh_token_family(c: &mut Conn, hash: &KeyHash) -> Result<TokenFamilyId> {
    let q = sqlx::query("SELECT family FROM refresh_tokens WHERE hash = ?1").bind(&hash.0[..]);
    let row = fetch_optional(c, "reading a refresh token", q).await?;
    let row = found(row, || "refresh token".into())?;
    Ok(TokenFamilyId::new(col::<String>(&row, 0)?))
}

// ---- notifications -----------------------------------------------------------

pub(crate) async fn put_notification(c: &mut Conn, n: &Notification) -> Result<()> {
    let placements = serde_json::to_string(&n.placements).unwrap_or_else(|_| "[]".into());
    let q = sqlx::query(
        "INSERT OR REPLACE INTO notifications (id, title, banner, popup, starts_at, ends_at, \
         placements) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(n.id.as_str())
    .bind(&n.title)
    .bind(&n.banner)
    .bind(&n.popup)
    .bind(n.starts_at.0)
    .bind(n.ends_at.0)
    .bind(placements);
    execute(c, "storing a notification", q).await.map(drop)
}

pub(crate) async fn delete_notification(c: &mut Conn, id: &str) -> Result<()> {
    let q = sqlx::query("DELETE FROM notifications WHERE id = ?1").bind(id);
    execute_found(c, "deleting a notification", q, || {
        format!("notification {id}")
    })
    .await
}

pub(crate) async fn notifications(c: &mut Conn) -> Result<Vec<Notification>> {
    let sql = concat!(
        "SELECT id, title, banner, popup, starts_at, ends_at, placements ",
        "FROM notifications ORDER BY starts_at, id"
    );
    let found = fetch_all(c, "reading notifications", sqlx::query(sql)).await?;
    found.iter().map(rows::notification).collect()
}

// ---- stats -------------------------------------------------------------------

pub(crate) async fn record_stats(c: &mut Conn, batch: &StatsBatch) -> Result<()> {
    let q = sqlx::query("INSERT OR IGNORE INTO stats_batches (id) VALUES (?1)").bind(&batch.id);
    if execute(c, "recording a stats batch", q).await? == 0 {
        return Ok(()); // applied before
    }
    // Sum the batch first, so each (scope, day) is read and written once.
    let mut sums: BTreeMap<(&str, Day), StatsCounters> = BTreeMap::new();
    for (day, scope, delta) in &batch.deltas {
        sums.entry((scope.as_str(), *day)).or_default().add(delta);
    }
    // Read every row the batch adds to in one statement, and write them
    // back in another.
    let keys: Vec<(&str, i32)> = sums.keys().map(|(scope, day)| (*scope, day.0)).collect();
    let q = sqlx::query(concat!(
        "SELECT ",
        stats_cols!(),
        " FROM stats WHERE (scope, day) IN ",
        "(SELECT value ->> 0, value ->> 1 FROM json_each(?1))"
    ))
    .bind(json(&keys)?);
    let mut stored: BTreeMap<(String, Day), StatsCounters> = BTreeMap::new();
    for row in &fetch_all(c, "reading stats", q).await? {
        let (scope, day, counters) = rows::stats(row)?;
        stored.insert((scope, day), counters);
    }
    let mut totals = Vec::with_capacity(sums.len());
    for ((scope, day), delta) in sums {
        let mut total = stored.remove(&(scope.to_owned(), day)).unwrap_or_default();
        total.add(&delta);
        let buckets = serde_json::to_string(&total.latency_buckets).unwrap_or_else(|_| "[]".into());
        totals.push((
            scope,
            i64::from(day.0),
            to_i64(total.requests),
            to_i64(total.failures),
            to_i64(total.input_tokens),
            to_i64(total.output_tokens),
            to_i64(total.units),
            to_i64(total.latency_ms_sum),
            buckets,
            total.charged,
            total.rewarded,
        ));
    }
    let q = sqlx::query(concat!(
        "INSERT OR REPLACE INTO stats (",
        stats_cols!(),
        ") SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, ",
        "value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10 ",
        "FROM json_each(?1)"
    ))
    .bind(json(&totals)?);
    execute(c, "storing stats", q).await.map(drop)
}

pub(crate) async fn stats(
    c: &mut Conn,
    scope: &str,
    from: Day,
    to: Day,
) -> Result<Vec<(Day, StatsCounters)>> {
    let sql = concat!(
        "SELECT ",
        stats_cols!(),
        " FROM stats ",
        "WHERE scope = ?1 AND day BETWEEN ?2 AND ?3 ORDER BY day"
    );
    let q = sqlx::query(sql)
        .bind(scope)
        .bind(i64::from(from.0))
        .bind(i64::from(to.0));
    let found = fetch_all(c, "reading stats", q).await?;
    found
        .iter()
        .map(|r| rows::stats(r).map(|(_, d, s)| (d, s)))
        .collect()
}

/// The smallest string greater than every string starting with `prefix`, if
/// any: bounds an index range scan over the prefix.
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        if (0xD800..0xE000).contains(&next) {
            next = 0xE000; // skip the surrogates, which are not chars
        }
        if let Some(ch) = char::from_u32(next) {
            chars.push(ch);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

pub(crate) async fn stats_by_prefix(
    c: &mut Conn,
    prefix: &str,
    from: Day,
    to: Day,
) -> Result<Vec<(String, StatsCounters)>> {
    let sql = concat!(
        "SELECT ",
        stats_cols!(),
        " FROM stats ",
        "WHERE scope >= ?1 AND (?2 IS NULL OR scope < ?2) AND day BETWEEN ?3 AND ?4"
    );
    let q = sqlx::query(sql)
        .bind(prefix)
        .bind(prefix_upper_bound(prefix))
        .bind(i64::from(from.0))
        .bind(i64::from(to.0));
    let found = fetch_all(c, "reading stats", q).await?;
    let mut out: BTreeMap<String, StatsCounters> = BTreeMap::new();
    for row in &found {
        let (scope, _, counters) = rows::stats(row)?;
        if scope.starts_with(prefix) {
            out.entry(scope).or_default().add(&counters);
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn prefix_bounds() {
        assert_eq!(
            prefix_upper_bound("model:chat:").as_deref(),
            Some("model:chat;")
        );
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(
            prefix_upper_bound("a\u{D7FF}").as_deref(),
            Some("a\u{E000}")
        );
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
    }
}
